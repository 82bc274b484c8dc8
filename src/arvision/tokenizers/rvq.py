"""Residual-VQ tokenizer (RQ-VAE, Lee et al. 2022): the VQ encoder/decoder around a residual quantiser.

Every latent vector z is quantised D times, each depth coding what the earlier ones left over:

    r_0 = z;   k_d = argmin_k ‖r_{d−1} − e_k‖²;   r_d = r_{d−1} − e_{k_d};   ẑ = Σ_d e_{k_d}

so the partial sums Σ_{i≤d} e_{k_i} approach z coarse to fine. Tokens: LongTensor (B, h, w, D); the first
d′ ≤ D depths alone decode to a coarser image.

Losses follow RQ-VAE's "cumsum" form: the commitment loss pulls z toward every partial sum,
β · mean_d ‖z − sg(Σ_{i≤d} e_i)‖², and in gradient mode the codebook loss pulls every partial sum toward z,
mean_d ‖sg(z) − Σ_{i≤d} e_i‖². With `ema=True` the codebook is instead the EMA of the residuals assigned to each
code (decay 0.99, Laplace-smoothed cluster sizes), and `restart_unused` re-seeds dead codes from the batch, as
RQ-VAE trains it. One difference: RQ-VAE updates a shared codebook after each depth (D updates per step, later
depths seeing codes changed mid-pass); here all depths are quantised with the same codebook and a shared
codebook gets one EMA update per step from the assignments of all depths pooled.
"""

from __future__ import annotations


from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvision.tokenizers.base import TokenSpec
from arvision.tokenizers.losses import reconstruction_loss
from arvision.tokenizers.nets import ConvTokenizer
from arvision.tokenizers.quantize import (distributed, nearest_code, random_rows, restart_dead_codes,
                                         usage_and_perplexity)


class ResidualQuantizer(nn.Module):
    """D-deep residual quantiser over one shared codebook or one codebook per depth.

    `l2_norm` l2-normalises the latent before quantisation (a bounded target, as LlamaGen's VQ); the codes are
    left free, since residuals shrink with depth and unit-norm codes could not follow them.
    """

    def __init__(self, *, vocab_size: int, dim: int, depth: int = 4, shared_codebook: bool = True,
                 beta: float = 0.25, ema: bool = False, ema_decay: float = 0.99, restart_unused: bool = False,
                 l2_norm: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.vocab_size = vocab_size
        self.dim = dim
        self.depth = depth
        self.shared_codebook = shared_codebook
        self.beta = beta
        self.ema = ema
        self.ema_decay = ema_decay
        self.restart_unused = restart_unused
        self.l2_norm = l2_norm
        self.eps = eps
        self.num_codebooks = 1 if shared_codebook else depth
        books = [nn.Embedding(vocab_size, dim) for _ in range(self.num_codebooks)]
        for book in books:
            nn.init.uniform_(book.weight, -1.0 / vocab_size, 1.0 / vocab_size)  # as VectorQuantizer
            book.weight.requires_grad_(not ema)  # EMA codebooks are set, not learned by the optimiser
        if shared_codebook:
            self.embedding = books[0]
        else:
            self.embeddings = nn.ModuleList(books)
        if ema:
            # EMA of how many vectors each code quantises. The EMA of their sum is not stored: it is the codebook
            # times the smoothed sizes, so the weights stay the single source of truth (loading or setting them
            # just works). Starting at one per code, a code nobody picks keeps its place as both decay alike.
            self.register_buffer("ema_cluster_size", torch.ones(self.num_codebooks, vocab_size))

    # --- codebooks ------------------------------------------------------------------------------------------------

    def book(self, d: int) -> nn.Embedding:
        """The codebook used at depth d (0-based)."""
        return self.embedding if self.shared_codebook else self.embeddings[d]

    def codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (..., D′) with D′ ≤ depth → the code of each depth (..., D′, dim)."""
        if not 1 <= indices.shape[-1] <= self.depth:
            raise ValueError(f"indices must have 1 … {self.depth} depths in their last dimension, "
                             f"got shape {tuple(indices.shape)}")
        return torch.stack([self.book(d).weight[indices[..., d]] for d in range(indices.shape[-1])], dim=-2)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w, D′) → the sum of their codes (B, dim, h, w); D′ < depth gives a coarser latent."""
        return rearrange(self.codes(indices).sum(dim=-2), "b h w c -> b c h w")

    # --- quantisation ---------------------------------------------------------------------------------------------

    def forward(self, z: torch.Tensor, *, update_codebook: bool = True,
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z (B, dim, h, w) → (straight-through ẑ (B, dim, h, w), indices (B, h, w, D), losses and stats).

        In training mode (and `update_codebook`) EMA and restarts change the codebook after ẑ is computed.
        """
        b, _, h, w = z.shape
        # Residuals shrink with depth; bf16 would round the deep ones away, so quantise in fp32.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = rearrange(z.float(), "b c h w -> (b h w) c")
            if self.l2_norm:
                z = F.normalize(z, dim=-1)
            residual = z.detach()
            partial = torch.zeros_like(z)  # Σ_{i≤d} e_i; carries the codebook's gradient in gradient mode
            residuals, indices, partial_sums = [], [], []
            for d in range(self.depth):
                weight = self.book(d).weight
                idx = nearest_code(residual, weight.detach())
                code = weight[idx]
                residuals.append(residual)
                indices.append(idx)
                residual = residual - code.detach()
                partial = partial + code
                partial_sums.append(partial)
            terms = {**self.losses(z, partial_sums), **self.stats(indices)}
            if self.training and update_codebook and (self.ema or self.restart_unused):
                self.update_codebooks(residuals, indices)
            z_q = z + (partial - z).detach()  # straight-through estimator
        z_q = rearrange(z_q, "(b h w) c -> b c h w", b=b, h=h, w=w)
        indices = rearrange(torch.stack(indices, dim=-1), "(b h w) d -> b h w d", b=b, h=h, w=w)
        return z_q, indices, terms

    def losses(self, z: torch.Tensor, partial_sums: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        # Every partial sum, not only the last, is tied to z: that is what makes depth 1 a coarse code on its own.
        commit = torch.stack([F.mse_loss(z, s.detach()) for s in partial_sums]).mean()
        losses = {"commit_loss": self.beta * commit}
        if not self.ema:
            losses["codebook_loss"] = torch.stack([F.mse_loss(s, z.detach()) for s in partial_sums]).mean()
        return losses

    def stats(self, indices: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        stats: dict[str, torch.Tensor] = {}
        for d, idx in enumerate(indices):
            stats[f"usage_d{d}"], stats[f"perplexity_d{d}"] = usage_and_perplexity(idx, self.vocab_size)
        stats["usage"] = torch.stack([stats[f"usage_d{d}"] for d in range(self.depth)]).mean()
        stats["perplexity"] = torch.stack([stats[f"perplexity_d{d}"] for d in range(self.depth)]).mean()
        return stats

    # --- codebook updates (training only) -------------------------------------------------------------------------

    @torch.no_grad()
    def update_codebooks(self, residuals: list[torch.Tensor], indices: list[torch.Tensor]) -> None:
        """EMA update and/or dead-code restart of each codebook from the residuals it quantised this batch.

        Written without data-dependent branches (no host sync); under DDP the statistics are summed and the
        restart candidates broadcast from rank 0, so every rank keeps the same codebook.
        """
        for c in range(self.num_codebooks):
            depths = range(self.depth) if self.shared_codebook else [c]
            vectors = torch.cat([residuals[d] for d in depths])
            idx = torch.cat([indices[d] for d in depths])
            weight = self.book(c).weight
            if self.ema:
                counts = torch.bincount(idx, minlength=self.vocab_size).to(vectors.dtype)
                sums = torch.zeros_like(weight).index_add_(0, idx, vectors)
                if distributed():
                    dist.all_reduce(counts)
                    dist.all_reduce(sums)
                size = self.ema_cluster_size[c]
                embed_sum = (weight * self.smoothed(size)[:, None]).lerp_(sums, 1 - self.ema_decay)
                size.lerp_(counts, 1 - self.ema_decay)
                if self.restart_unused:
                    # RQ-VAE's rule: a code hit less than once per batch on average becomes a random residual.
                    dead = size < 1.0
                    embed_sum = torch.where(dead[:, None], random_rows(vectors, self.vocab_size), embed_sum)
                    size.copy_(torch.where(dead, torch.ones_like(size), size))
                weight.copy_(embed_sum / self.smoothed(size)[:, None])
            else:
                restart_dead_codes(weight, vectors, idx)

    def smoothed(self, size: torch.Tensor) -> torch.Tensor:
        """Laplace-smoothed cluster sizes: no code divides by ~0, and the total count is kept."""
        total = size.sum()
        return (size + self.eps) / (total + self.vocab_size * self.eps) * total

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, dim={self.dim}, depth={self.depth}, "
                f"shared_codebook={self.shared_codebook}, beta={self.beta}, ema={self.ema}, "
                f"ema_decay={self.ema_decay}, restart_unused={self.restart_unused}, l2_norm={self.l2_norm}")


class RVQTokenizer(ConvTokenizer):
    """Conv encoder → 1×1 quant_conv → residual quantiser → 1×1 post_quant_conv → decoder (VQ's key layout)."""

    def __init__(
        self,
        *,
        vocab_size: int = 1024,
        code_dim: int = 8,
        depth: int = 4,
        shared_codebook: bool = True,
        beta: float = 0.25,
        ema: bool = False,
        ema_decay: float = 0.99,
        restart_unused: bool = False,
        l2_norm: bool = False,
        name: str = "rvq",
        **net: Any,  # ConvTokenizer's network keys and image size
    ) -> None:
        super().__init__(**net)
        side = self.latent_side
        self.quant_conv = nn.Conv2d(self.z_channels, code_dim, 1)
        self.quantize = ResidualQuantizer(vocab_size=vocab_size, dim=code_dim, depth=depth,
                                          shared_codebook=shared_codebook, beta=beta, ema=ema, ema_decay=ema_decay,
                                          restart_unused=restart_unused, l2_norm=l2_norm)
        self.post_quant_conv = nn.Conv2d(code_dim, self.z_channels, 1)
        self.decoder = self.make_decoder()
        self.spec = TokenSpec(name=name, kind="discrete", layout="depth", grid=(side, side), dim=code_dim,
                              vocab_size=vocab_size, depth=depth, shared_codebook=shared_codebook,
                              image_size=self.image_size, image_channels=self.image_channels)

    def quantize_images(self, images: torch.Tensor, *, update_codebook: bool = True,
                        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return self.quantize(self.quant_conv(self.encoder(images)), update_codebook=update_codebook)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → tokens (B, h, w, D). Never changes the codebook, even in training mode."""
        return self.quantize_images(images, update_codebook=False)[1]

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w, D′) → summed codes (B, code_dim, h, w), the decoder's input before post_quant_conv."""
        return self.quantize.lookup(indices)

    def decode_codes(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w, D′), D′ ≤ D (fewer depths: a coarser image) → images in [-1, 1]."""
        return self.decode_codes(self.lookup(tokens)).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z_q, indices, terms = self.quantize_images(images)
        recon = self.decode_codes(z_q)
        rec = reconstruction_loss(recon, images, self.recon_loss)
        quant = sum(v for k, v in terms.items() if k.endswith("_loss"))
        return {"recon": recon, "indices": indices, "loss": rec + quant, "recon_loss": rec, **terms}



def usage_per_depth(tokens: torch.Tensor, vocab_size: int) -> list[tuple[float, float]]:
    """(usage, perplexity) of each depth's codes in `tokens` (B, h, w, D), e.g. a whole evaluation set.

    `CodebookUsage` pools all depths into one histogram; RQ-VAE-style reporting needs them apart, since deep
    levels code small residuals and typically use fewer codes.
    """
    if tokens.dim() != 4:
        raise ValueError(f"usage_per_depth needs tokens (B, h, w, D), got shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"code indices must lie in [0, {vocab_size}); got [{int(tokens.min())}, {int(tokens.max())}]")
    out = []
    for d in range(tokens.shape[-1]):
        usage, perplexity = usage_and_perplexity(tokens[..., d].long(), vocab_size)
        out.append((usage.item(), perplexity.item()))
    return out


__all__ = ["RVQTokenizer", "ResidualQuantizer", "usage_per_depth"]
