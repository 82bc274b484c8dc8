"""The contract between stage 1 (tokenizers) and stage 2 (generators).

A tokenizer turns images in [-1, 1] into tokens and back. Its `spec` tells a generator everything it may rely
on: whether tokens are discrete or continuous, how they are laid out, the vocabulary and the grid.

Token tensors by layout:
    grid        LongTensor (B, h, w)
    depth       LongTensor (B, h, w, D)           residual VQ
    scales      list[LongTensor (B, n_k, n_k)]     multi-scale residual VQ, coarse to fine
    continuous  FloatTensor (B, C, h, w)           already normalised (scaling factor applied)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

TokenKind = Literal["discrete", "continuous"]
TokenLayout = Literal["grid", "depth", "scales"]


class MissingExtra(ImportError):
    """An optional dependency (an extra such as arvision[vqp]) is not installed; the message says how to get it."""


@dataclass(frozen=True)
class TokenSpec:
    """What a generator may rely on about a tokenizer's tokens."""

    name: str  # the tokenizer's config name (vq, rvq, msvq, vae): used in error messages
    kind: TokenKind
    layout: TokenLayout
    grid: tuple[int, int]  # (h, w) of the finest token map
    dim: int  # code (discrete) or latent (continuous) channels
    vocab_size: int | None = None  # discrete only
    depth: int = 1  # residual VQ depth
    shared_codebook: bool = True  # residual VQ: one codebook for all depths (RQ-VAE), or one per depth
    scales: tuple[int, ...] = field(default=())  # side lengths, multi-scale only
    has_codebook: bool = False  # discrete: `Tokenizer.codebook()` / `nearest_codes()` give the code vectors
    image_size: int = 32
    image_channels: int = 3

    def __post_init__(self) -> None:
        if self.kind == "discrete" and not self.vocab_size:
            raise ValueError("a discrete TokenSpec needs vocab_size")
        if self.layout == "scales" and not self.scales:
            raise ValueError("a multi-scale TokenSpec needs scales")
        if self.has_codebook and self.kind != "discrete":
            raise ValueError("only a discrete TokenSpec has a codebook")

    @property
    def num_tokens(self) -> int:
        """Tokens a generator predicts per image (positions × depth, or the sum over scales)."""
        if self.layout == "scales":
            return sum(s * s for s in self.scales)
        return self.grid[0] * self.grid[1] * self.depth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Tokenizer(nn.Module):
    """Base class of every stage-1 model.

    Subclasses set `self.spec` and implement `encode`, `decode` and `forward`. `forward(images)` returns a
    dict with `recon` (images in [-1, 1]), `loss` (the total generator-side loss), the individual loss terms
    and per-batch stats (`usage`, `perplexity` for discrete tokenizers).

    Optional abilities are declared, never discovered: `spec.has_codebook` with `codebook`, `nearest_codes` and
    `encode_scales` (FlexVAR's per-scale tokens), `has_scaling_factor` with `calibrate_scaling` (continuous
    latents scaled to unit variance after stage 1), the multi-scale operations of `MultiScaleTokenizer` for
    `layout="scales"`, and the residual ones of `ResidualTokenizer` for `layout="depth"`.
    """

    spec: TokenSpec
    has_scaling_factor: ClassVar[bool] = False

    def encode(self, images: torch.Tensor) -> Any:
        raise NotImplementedError

    def decode(self, tokens: Any) -> torch.Tensor:
        raise NotImplementedError

    def codebook(self) -> torch.Tensor:
        """The code vectors (vocab_size, dim) as the nearest-code rule compares them (l2-normalised for a cosine
        lookup); only when `spec.has_codebook`."""
        raise NotImplementedError(f"tokenizer={self.spec.name} exposes no codebook")

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Indices (N,) of the codes the tokenizer's own lookup picks for vectors `z` (N, dim)."""
        raise NotImplementedError(f"tokenizer={self.spec.name} exposes no codebook")

    def encode_scales(self, images: torch.Tensor, sides: Sequence[int]) -> list[torch.Tensor]:
        """One token map (B, n, n) per side n: the continuous latent area-resized to n and quantised on its own
        (FlexVAR's per-scale ground truth); only when `spec.has_codebook`."""
        raise NotImplementedError(f"tokenizer={self.spec.name} exposes no codebook")

    def calibrate_scaling(self, images: torch.Tensor | Iterable, *, max_images: int | None = None) -> float:
        """Set and return the latent scaling factor measured on `images`; only when `has_scaling_factor`."""
        raise NotImplementedError(f"tokenizer={self.spec.name} has no latent scaling factor")

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images)).clamp(-1, 1)


class MultiScaleTokenizer(Tokenizer):
    """A tokenizer with `layout="scales"` (VAR): residual maps n_1 < … < n_K whose sum of upsampled code maps is the
    latent f̂. Next-scale prediction teacher-forces and samples through these operations."""

    def teacher_forcing_inputs(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """The inputs of scales 2..K given all K maps: (B, Σ_{k≥2} n_k², dim), each the running f̂ after scale k − 1
        area-downsampled to n_k."""
        raise NotImplementedError

    def next_scale_input(self, k: int, f_hat: torch.Tensor | None,
                         indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale k's sampled `indices` to the running f̂ (None: start from zeros) and return (f̂, the input of
        scale k + 1 (B, n², dim), None after the last scale). Float `indices` (B, n², dim) are code vectors
        themselves (VAR's `more_smooth` mixes of `code_vectors()`)."""
        raise NotImplementedError

    def code_vectors(self) -> torch.Tensor:
        """The codebook rows (vocab_size, dim) that f̂ sums (the raw ones, also under a cosine lookup)."""
        raise NotImplementedError


class ResidualTokenizer(Tokenizer):
    """A tokenizer with `layout="depth"` (RQ-VAE): D codes per position, each quantising what the earlier ones left.
    The RQ-Transformer reads its code vectors (its input embeddings) and, for soft targets, its latents."""

    def depth_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (..., D′), D′ ≤ D → the code vector of each depth (..., D′, dim), frozen."""
        raise NotImplementedError

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → the latents the quantiser reads (B, dim, h, w)."""
        raise NotImplementedError

    def soft_codes(self, latents: torch.Tensor, *, temperature: float, stochastic: bool = True,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RQ-VAE's soft codes of `latents` (B, dim, h, w): (probabilities (B, h, w, D, vocab), codes (B, h, w, D))."""
        raise NotImplementedError
