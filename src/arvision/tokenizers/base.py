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
from typing import Any, Literal

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
    image_size: int = 32
    image_channels: int = 3

    def __post_init__(self) -> None:
        if self.kind == "discrete" and not self.vocab_size:
            raise ValueError("a discrete TokenSpec needs vocab_size")
        if self.layout == "scales" and not self.scales:
            raise ValueError("a multi-scale TokenSpec needs scales")

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
    """

    spec: TokenSpec

    def encode(self, images: torch.Tensor) -> Any:
        raise NotImplementedError

    def decode(self, tokens: Any) -> torch.Tensor:
        raise NotImplementedError

    def last_decoder_layer(self) -> torch.Tensor:
        """Weight of the decoder's last layer, for the adaptive GAN weight (VQGAN)."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images)).clamp(-1, 1)
