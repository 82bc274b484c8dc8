"""VAR's multi-scale residual VQ tokenizer: conv encoder → 3×3 quant_conv → K-scale residual quantiser → decoder.

Tokens: list[LongTensor (B, n_k, n_k)] for the schedule `scales` = (n_1, …, n_K), coarse to fine, n_K = latent side.

Quantisation (VAR `VectorQuantizer2`), with f the (B, C, side, side) feature and one codebook shared by all scales:

    residual = f;  f̂ = 0
    for k, n in enumerate(scales):
        idx_k = nearest code of area_downsample(residual, n)        (no resize at the last scale)
        h_k   = φ_k(bicubic_upsample(codebook[idx_k], side))         (no resize at the last scale)
        f̂ += h_k;  residual −= h_k

φ_k(h) = (1 − r)·h + r·conv(h) (VAR's `quant_resi`, r = 0.5) with `phi_count` convs shared across the K scales by
VAR's tick rule. A next-scale generator needs two more things, both here: the teacher-forcing inputs (the running f̂
after scales 1..k−1, area-downsampled to n_k) and the same accumulation step by step at sampling time.

Indexing: scale k is 0-based everywhere (tokens[k], `usage_s{k}`, `next_scale_input(k, …)`), as in VAR's `si`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvision.tokenizers.base import MultiScaleTokenizer, TokenSpec
from arvision.tokenizers.losses import reconstruction_loss
from arvision.tokenizers.nets import ConvTokenizer
from arvision.tokenizers.quantize import (balanced_rows, nearest_code, restart_dead_codes,
                                         usage_and_perplexity)

# VAR's 256-pixel schedule (16×16 latent): K = 10 scales, 680 tokens.
VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def default_scales(side: int) -> tuple[int, ...]:
    """VAR's schedule truncated to the latent side and ending exactly at it (side 8 → 1, 2, 3, 4, 5, 6, 8)."""
    return tuple(n for n in VAR_SCALES if n < side) + (side,)


def check_scales(scales: Sequence[int], side: int) -> tuple[int, ...]:
    scales = tuple(int(n) for n in scales)
    if not scales:
        raise ValueError(f"scales must not be empty; use e.g. {default_scales(side)} for a {side}×{side} latent")
    if scales[0] < 1 or any(b <= a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must be strictly increasing positive side lengths, got {scales}")
    if scales[-1] != side:
        raise ValueError(f"scales must end at the latent side {side} (image_size / 2^(len(ch_mult) − 1)), "
                         f"got {scales}")
    return scales


def phi_index(k: int, num_scales: int, count: int) -> int:
    """Which of `count` φ's scale k uses: the one whose tick is nearest to k / (K − 1) (VAR's partial sharing).

    VAR's ticks are linspace(1/(3·count), 1 − 1/(3·count), count) for count = 4 and linspace(1/(2·count), …)
    otherwise. Computed in float64 with numpy exactly as VAR does: ties (e.g. k = 2 and 7 of 10 with 4 φ's) are
    decided by rounding, and float32 would send them elsewhere.
    """
    if count == 4:
        ticks = np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
    else:
        ticks = np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)
    at = k / (num_scales - 1) if num_scales > 1 else 0.0  # a single scale uses the first φ
    return int(np.argmin(np.abs(ticks - at)))


def full_precision(x: torch.Tensor) -> torch.autocast:
    # VAR quantises with autocast off: argmin over bf16 distances and bicubic sums would drift.
    return torch.autocast(device_type=x.device.type, enabled=False)


class Phi(nn.Conv2d):
    """φ(h) = (1 − ratio)·h + ratio·conv(h): a k×k conv blended with identity (VAR's `Phi`, same weight keys)."""

    def __init__(self, dim: int, kernel: int, ratio: float) -> None:
        super().__init__(dim, dim, kernel, padding=kernel // 2)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class MultiScaleQuantizer(nn.Module):
    """The K-scale residual quantiser over a (B, dim, side, side) feature, with the generator-side helpers."""

    def __init__(self, *, vocab_size: int, dim: int, scales: Sequence[int], beta: float = 0.25,
                 phi_kernel: int = 3, phi_ratio: float = 0.5, phi_count: int = 4, l2_norm: bool = False,
                 restart_unused: bool = False, restart_patience: int = 1, restart_balanced: bool = False) -> None:
        super().__init__()
        if restart_patience < 1:
            raise ValueError(f"restart_patience must be ≥ 1 (batches without a choice), got {restart_patience}")
        self.restart_unused = restart_unused
        self.restart_patience = restart_patience
        self.restart_balanced = restart_balanced
        if not scales:
            raise ValueError("scales must not be empty")
        self.scales = check_scales(scales, scales[-1])
        self.side = self.scales[-1]
        self.vocab_size, self.dim, self.beta, self.l2_norm = vocab_size, dim, beta, l2_norm
        if phi_kernel < 1 or phi_kernel % 2 == 0:
            raise ValueError(f"phi_kernel must be a positive odd number (same-size conv), got {phi_kernel}")
        if phi_count < 0:
            raise ValueError(f"phi_count must be ≥ 0 (0: one φ per scale), got {phi_count}")
        self.embedding = nn.Embedding(vocab_size, dim)  # one codebook shared by every scale
        nn.init.uniform_(self.embedding.weight, -1.0 / vocab_size, 1.0 / vocab_size)
        # VAR: phi_count 0 = one φ per scale, 1 = one shared φ, else partially shared. A zero ratio is the identity.
        self.phi_count = phi_count  # VAR names the three kinds differently in its files (arvision.imports.var)
        count = phi_count or len(self.scales)
        self.quant_resi = nn.ModuleList(
            [Phi(dim, phi_kernel, phi_ratio) if abs(phi_ratio) > 1e-6 else nn.Identity() for _ in range(count)])
        self.phi_of_scale = tuple(phi_index(k, len(self.scales), count) for k in range(len(self.scales)))
        if restart_unused and restart_patience > 1:  # batches since each code was last chosen by any scale
            self.register_buffer("idle_steps", torch.zeros(vocab_size, dtype=torch.long))
        else:
            self.idle_steps = None

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    # ---------------------------------------------------------------------------------------- one scale
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, dim, n, n) → indices (B, n, n) of the nearest code (Euclidean; cosine with l2_norm)."""
        b, _, h, w = z.shape
        flat = rearrange(z, "b c h w -> (b h w) c")
        codebook = self.embedding.weight.detach()
        if self.l2_norm:
            # VAR's `using_znorm`: only the choice is by cosine; the raw code vectors are still summed, so the
            # residual can shrink below unit norm.
            flat, codebook = F.normalize(flat, dim=-1), F.normalize(codebook, dim=-1)
        return nearest_code(flat, codebook).view(b, h, w)

    def contribution(self, k: int, indices: torch.Tensor) -> torch.Tensor:
        """h_k = φ_k(bicubic_upsample(codebook[idx_k])) at the full side: what scale k adds to f̂. Float `indices`
        (B, n, n, dim) or (B, n², dim) are the code vectors themselves (VAR's `more_smooth` codebook mixes)."""
        n = self.scales[k]
        if indices.is_floating_point():
            h = rearrange(indices.reshape(indices.shape[0], n, n, self.dim).float(), "b h w c -> b c h w")
        else:
            indices = indices.reshape(indices.shape[0], n, n).long()  # accepts (B, n, n) or flat (B, n²)
            h = rearrange(self.embedding(indices), "b h w c -> b c h w")
        if n != self.side:
            h = F.interpolate(h, size=(self.side, self.side), mode="bicubic")
        return self.quant_resi[self.phi_of_scale[k]](h)

    def downsample(self, f_hat: torch.Tensor, n: int) -> torch.Tensor:
        """Area-downsample to n×n and flatten row-major to tokens: (B, dim, side, side) → (B, n², dim)."""
        if n != f_hat.shape[-1]:
            f_hat = F.interpolate(f_hat, size=(n, n), mode="area")
        return rearrange(f_hat, "b c h w -> b (h w) c")

    # ---------------------------------------------------------------------------------------- training
    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
        """f (B, dim, side, side) → (straight-through f̂, indices per scale, losses and stats)."""
        if f.shape[-2:] != (self.side, self.side):
            raise ValueError(f"expected a {self.side}×{self.side} feature map, got {tuple(f.shape[-2:])}")
        with full_precision(f):
            f = f.float()
            target = f.detach()
            residual = target.clone()
            f_hat = torch.zeros_like(target)
            indices: list[torch.Tensor] = []
            chosen: list[torch.Tensor] = []  # what each scale quantised: restart candidates for dead codes
            codebook_loss = commit_loss = f.new_zeros(())
            stats: dict[str, torch.Tensor] = {}
            for k, n in enumerate(self.scales):
                rest = residual if n == self.side else F.interpolate(residual, size=(n, n), mode="area")
                idx = self.nearest(rest)
                chosen.append(rearrange(rest, "b c h w -> (b h w) c"))
                h = self.contribution(k, idx)
                f_hat = f_hat + h
                residual = residual - h.detach()  # the residual only chooses codes; no gradient flows through it
                indices.append(idx)
                # VAR: on the *cumulative* f̂ after each scale, MSE(f̂, sg f) moves the codebook and φ's,
                # β·MSE(sg f̂, f) commits the encoder; both are averaged over the K scales.
                codebook_loss = codebook_loss + F.mse_loss(f_hat, target)
                commit_loss = commit_loss + self.beta * F.mse_loss(f_hat.detach(), f)
                stats[f"usage_s{k}"], stats[f"perplexity_s{k}"] = usage_and_perplexity(idx, self.vocab_size)
            f_hat_st = f + (f_hat - f).detach()  # straight-through: the decoder's gradient goes to the encoder
            if self.training and self.restart_unused:  # one shared codebook: a code is dead if no scale chose it
                pool = balanced_rows(chosen, self.vocab_size) if self.restart_balanced else torch.cat(chosen)
                restart_dead_codes(self.embedding.weight, pool, torch.cat([i.flatten() for i in indices]),
                                   self.idle_steps, self.restart_patience)
        stats["usage"] = torch.stack([stats[f"usage_s{k}"] for k in range(self.num_scales)]).mean()
        stats["perplexity"] = torch.stack([stats[f"perplexity_s{k}"] for k in range(self.num_scales)]).mean()
        losses = {"codebook_loss": codebook_loss / self.num_scales, "commit_loss": commit_loss / self.num_scales}
        return f_hat_st, indices, {**losses, **stats}

    # ---------------------------------------------------------------------------------------- from indices
    def _check_tokens(self, tokens: Sequence[torch.Tensor], at_most: int) -> None:
        if len(tokens) > at_most:
            raise ValueError(f"got {len(tokens)} token maps for a schedule of {self.num_scales} scales {self.scales}")

    def indices_to_fhat(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Σ_k h_k over the given scales → f̂ (B, dim, side, side); a prefix of the scales gives the partial f̂."""
        self._check_tokens(tokens, self.num_scales)
        f_hat = None
        for k, idx in enumerate(tokens):
            f_hat, _ = self.next_scale_input(k, f_hat, idx)
        assert f_hat is not None, "indices_to_fhat needs at least one scale"
        return f_hat

    def next_scale_input(self, k: int, f_hat: torch.Tensor | None,
                         indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sampling step (VAR's `get_next_autoregressive_input`): f̂ += h_k; the next scale's input is f̂
        area-downsampled to n_{k+1}, as tokens (B, n_{k+1}², dim); None after the last scale.

        `f_hat` None starts from zeros; `indices` may be (B, n_k, n_k) or flat (B, n_k²). Returns a new f̂.
        """
        with full_precision(indices):
            h = self.contribution(k, indices)
            f_hat = h if f_hat is None else f_hat.float() + h
            if k == self.num_scales - 1:
                return f_hat, None
            return f_hat, self.downsample(f_hat, self.scales[k + 1])

    def teacher_forcing_inputs(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """VAR's `idxBl_to_var_input`: inputs for scales 2..K from ground-truth indices, (B, Σ_{k≥2} n_k², dim).

        The input for scale k+1 is the running f̂ after scales 1..k area-downsampled to n_{k+1} (the cumulative f̂,
        not scale k's embedding). The last scale's indices are not needed (K − 1 maps suffice). fp32.
        """
        self._check_tokens(tokens, self.num_scales)
        if len(tokens) < self.num_scales - 1:
            raise ValueError(f"teacher forcing needs the first {self.num_scales - 1} of {self.num_scales} scales, "
                             f"got {len(tokens)}")
        b = tokens[0].shape[0] if tokens else 0
        f_hat, inputs = None, []
        for k in range(self.num_scales - 1):
            f_hat, nxt = self.next_scale_input(k, f_hat, tokens[k])
            inputs.append(nxt)
        if not inputs:  # a single scale: the generator predicts it from the class token alone
            return self.embedding.weight.new_zeros(b, 0, self.dim, dtype=torch.float32)
        return torch.cat(inputs, dim=1)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, dim={self.dim}, scales={self.scales}, beta={self.beta}, "
                f"l2_norm={self.l2_norm}, restart_unused={self.restart_unused}, "
                f"restart_patience={self.restart_patience}, restart_balanced={self.restart_balanced}, "
                f"phi_of_scale={self.phi_of_scale}")


class MultiScaleVQTokenizer(ConvTokenizer, MultiScaleTokenizer):
    def __init__(
        self,
        *,
        vocab_size: int = 1024,
        code_dim: int = 8,
        scales: tuple[int, ...] | None = None,
        beta: float = 0.25,
        phi_kernel: int = 3,
        phi_ratio: float = 0.5,
        phi_count: int = 4,
        l2_norm: bool = False,
        restart_unused: bool = False,
        restart_patience: int = 1,
        restart_balanced: bool = False,
        name: str = "msvq",
        **net: Any,  # ConvTokenizer's network keys and image size
    ) -> None:
        super().__init__(**net)
        side = self.latent_side
        scales = check_scales(default_scales(side) if scales is None else scales, side)
        self.quant_conv = nn.Conv2d(self.z_channels, code_dim, 3, padding=1)  # 3×3, as VAR (LlamaGen's VQ uses 1×1)
        self.quantize = MultiScaleQuantizer(vocab_size=vocab_size, dim=code_dim, scales=scales, beta=beta,
                                            phi_kernel=phi_kernel, phi_ratio=phi_ratio, phi_count=phi_count,
                                            l2_norm=l2_norm, restart_unused=restart_unused,
                                            restart_patience=restart_patience, restart_balanced=restart_balanced)
        self.post_quant_conv = nn.Conv2d(code_dim, self.z_channels, 3, padding=1)
        self.decoder = self.make_decoder()
        self.spec = TokenSpec(name=name, kind="discrete", layout="scales", grid=(side, side), dim=code_dim,
                              vocab_size=vocab_size, scales=scales, image_size=self.image_size,
                              image_channels=self.image_channels)

    @property
    def scales(self) -> tuple[int, ...]:
        return self.quantize.scales

    def quantize_images(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor],
                                                             dict[str, torch.Tensor]]:
        return self.quantize(self.quant_conv(self.encoder(images)))

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.quantize_images(images)[1]

    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat))

    def fhat_to_image(self, f_hat: torch.Tensor) -> torch.Tensor:
        """The final accumulated f̂ (B, code_dim, side, side) → images in [-1, 1]."""
        return self.decode_fhat(f_hat).clamp(-1, 1)

    def indices_to_fhat(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.quantize.indices_to_fhat(tokens)

    def decode(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(tokens) != len(self.scales):
            raise ValueError(f"decode needs all {len(self.scales)} scales {self.scales}, got {len(tokens)} maps")
        return self.fhat_to_image(self.indices_to_fhat(tokens))

    def teacher_forcing_inputs(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.quantize.teacher_forcing_inputs(tokens)

    def code_vectors(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def next_scale_input(self, k: int, f_hat: torch.Tensor | None,
                         indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.quantize.next_scale_input(k, f_hat, indices)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        f_hat, indices, terms = self.quantize_images(images)
        recon = self.decode_fhat(f_hat)
        rec = reconstruction_loss(recon, images, self.recon_loss)
        quant = sum(v for k, v in terms.items() if k.endswith("_loss"))
        return {"recon": recon, "indices": indices, "loss": rec + quant, "recon_loss": rec, **terms}



__all__ = ["MultiScaleQuantizer", "MultiScaleVQTokenizer", "Phi", "VAR_SCALES", "default_scales", "phi_index"]
