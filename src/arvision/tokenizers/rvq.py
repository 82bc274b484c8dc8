"""Residual-VQ tokenizer (RQ-VAE, Lee et al. 2022): the VQ encoder/decoder around a residual quantiser.

Every latent vector z is quantised D times, each depth coding what the earlier ones left over:

    r_0 = z;   k_d = argmin_k ‖r_{d−1} − e_k‖²;   r_d = r_{d−1} − e_{k_d};   ẑ = Σ_d e_{k_d}

so the partial sums Σ_{i≤d} e_{k_i} approach z coarse to fine. Tokens: LongTensor (B, h, w, D); the first
d′ ≤ D depths alone decode to a coarser image.

Losses follow RQ-VAE's "cumsum" form: the commitment loss pulls z toward every partial sum,
β · mean_d ‖z − sg(Σ_{i≤d} e_i)‖², and in gradient mode the codebook loss pulls every partial sum toward z,
mean_d ‖sg(z) − Σ_{i≤d} e_i‖². With `ema=True` the codebook is RQ-VAE's `VQEmbedding`, step for step:
- buffers `ema_cluster_size` (zeros) and `ema_embed_sum` (a copy of the initial codebook, drawn N(0, 1) as
  `nn.Embedding` draws it) are the EMAs (decay 0.99) of how many residuals each code quantised and of their sum;
  the codebook is their ratio with Laplace-smoothed sizes;
- a shared codebook is updated after each depth, so depth d + 1 is looked up in the codebook depth d just moved
  (D updates per training step), each depth's lookup returning the codes from before its own update;
- `restart_unused` re-seeds every code whose EMA count is below 1 with a random residual of this depth (the batch
  tiled with uniform noise of 0.01/√dim when it holds fewer vectors than codes) and sets its count to 1. Since the
  counts start at 0, the first step re-seeds every code used fewer than 1/(1 − decay) = 100 times, and a used
  code keeps (decay·e + (1 − decay)·Σ)/count: RQ-VAE's start, which arvision reproduces.
Distances are RQ-VAE's ‖r‖² + ‖e‖² − 2 r·e (one `addmm`), so the same codes win the same near-ties.

For the RQ-Transformer the tokenizer also gives (`ResidualTokenizer`) the code vectors of each depth, the
pre-quantisation latents and RQ-VAE's soft codes: at each depth softmax(−‖r − e_k‖² / T) over the codebook, with
the code drawn from it (stochastic) or its argmin, and the residual taken with the drawn code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvision.tokenizers.base import ResidualTokenizer, TokenSpec
from arvision.tokenizers.losses import reconstruction_loss
from arvision.tokenizers.nets import ConvTokenizer
from arvision.tokenizers.quantize import distributed, restart_dead_codes, usage_and_perplexity


def code_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared distances (N, K) of rows z (N, dim) to the codes (K, dim), computed as RQ-VAE computes them
    (‖z‖² + ‖e‖² − 2 z·e in one addmm), so that argmin and softmax see the same numbers."""
    codebook_t = codebook.t()
    return torch.addmm(z.pow(2.0).sum(dim=1, keepdim=True) + codebook_t.pow(2.0).sum(dim=0, keepdim=True),
                       z, codebook_t, alpha=-2.0)


def restart_candidates(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """k random rows of `vectors` (N, d) as RQ-VAE draws them (the same random calls, in the same order): fewer than
    k vectors are first tiled and moved by uniform noise of scale 0.01/√d; identical on every rank (rank 0's)."""
    n, d = vectors.shape
    if n < k:
        std = vectors.new_full((d,), 0.01) / math.sqrt(d)
        vectors = vectors.repeat((k + n - 1) // n, 1)
        vectors = vectors + torch.rand_like(vectors) * std
    rows = vectors[torch.randperm(vectors.shape[0], device=vectors.device)][:k].contiguous()
    if distributed():
        dist.broadcast(rows, 0)
    return rows


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
            if not ema:  # gradient-learned: VectorQuantizer's start; EMA keeps nn.Embedding's N(0, 1), as RQ-VAE
                nn.init.uniform_(book.weight, -1.0 / vocab_size, 1.0 / vocab_size)
            book.weight.requires_grad_(not ema)  # EMA codebooks are set, not learned by the optimiser
        if shared_codebook:
            self.embedding = books[0]
        else:
            self.embeddings = nn.ModuleList(books)
        if ema:
            # RQ-VAE's EMA state: the counts start at zero and the sums at the initial codebook.
            self.register_buffer("ema_cluster_size", torch.zeros(self.num_codebooks, vocab_size))
            self.register_buffer("ema_embed_sum", torch.stack([b.weight.detach().clone() for b in books]))

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

        In training mode (and `update_codebook`) an EMA codebook is updated after each depth's lookup (see the
        module docstring); a gradient-learned one with `restart_unused` re-seeds its dead codes after the pass.
        """
        b, _, h, w = z.shape
        update = self.training and update_codebook
        # Residuals shrink with depth; bf16 would round the deep ones away, so quantise in fp32.
        with torch.autocast(device_type=z.device.type, enabled=False):
            # contiguous rows, as RQ-VAE's: a strided view (one image) would reduce and multiply in another order
            z = rearrange(z.float(), "b c h w -> (b h w) c").contiguous()
            if self.l2_norm:
                z = F.normalize(z, dim=-1)
            residual = z.detach()
            partial = torch.zeros_like(z)  # Σ_{i≤d} e_i; carries the codebook's gradient in gradient mode
            residuals, indices, partial_sums = [], [], []
            for d in range(self.depth):
                weight = self.book(d).weight
                idx = code_distances(residual, weight.detach()).argmin(dim=1)
                code = weight[idx]  # a copy: this depth's codes from before its own EMA update
                if update and self.ema:
                    self.ema_update(0 if self.shared_codebook else d, residual, idx)
                residuals.append(residual)
                indices.append(idx)
                residual = residual - code.detach()
                partial = partial + code
                partial_sums.append(partial)
            terms = {**self.losses(z, partial_sums), **self.stats(indices)}
            if update and not self.ema and self.restart_unused:
                self.restart_gradient_codebooks(residuals, indices)
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

    @torch.no_grad()
    def soft_codes(self, z: torch.Tensor, *, temperature: float, stochastic: bool = True,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RQ-VAE's `get_soft_codes`: z (B, dim, h, w) → (soft codes (B, h, w, D, K), codes (B, h, w, D)).

        At depth d the soft code is softmax(−‖r_{d−1} − e_k‖² / T) over the K codes; the code is drawn from it
        (`stochastic`, with `generator`) or is its argmin, and r_d = r_{d−1} − e_{code}."""
        if temperature <= 0:
            raise ValueError(f"the soft-code temperature must be > 0, got {temperature}")
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = rearrange(z.float(), "b c h w -> (b h w) c").contiguous()
            if self.l2_norm:
                residual = F.normalize(residual, dim=-1)
            softs, codes = [], []
            for d in range(self.depth):
                weight = self.book(d).weight.float()
                distances = code_distances(residual, weight)
                soft = F.softmax(-distances / temperature, dim=-1)
                code = (torch.multinomial(soft, 1, generator=generator).squeeze(1) if stochastic
                        else distances.argmin(dim=-1))
                residual = residual - weight[code]
                softs.append(soft)
                codes.append(code)
        soft = rearrange(torch.stack(softs, dim=1), "(b h w) d k -> b h w d k", b=b, h=h, w=w)
        return soft, rearrange(torch.stack(codes, dim=-1), "(b h w) d -> b h w d", b=b, h=h, w=w)

    # --- codebook updates (training only) -------------------------------------------------------------------------

    @torch.no_grad()
    def ema_update(self, c: int, vectors: torch.Tensor, idx: torch.Tensor) -> None:
        """RQ-VAE's `_update_buffers` then `_update_embedding` for codebook c, from the residuals `vectors` (N, dim)
        one depth assigned to the codes `idx` (N,). No data-dependent branch (no host sync); under DDP the sums
        are all-reduced and the restart candidates broadcast from rank 0, so every rank keeps the same codebook."""
        # RQ-VAE's one-hot product (K × N): the same sums to the last bit, so that the near-tied lookups after a
        # restart (tiled copies of the batch 0.01/√dim apart) go the same way as in RQ-VAE
        one_hot = vectors.new_zeros(self.vocab_size, vectors.shape[0])
        one_hot.scatter_(0, idx[None], vectors.new_ones(1, vectors.shape[0]))
        counts, sums = one_hot.sum(dim=1), one_hot @ vectors
        if distributed():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        size, embed_sum = self.ema_cluster_size[c], self.ema_embed_sum[c]
        size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        embed_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        if self.restart_unused:
            # a code counted less than once (in EMA) becomes a random residual of this depth, with count 1
            candidates = restart_candidates(vectors, self.vocab_size)
            usage = (size.view(-1, 1) >= 1).to(vectors.dtype)
            embed_sum.mul_(usage).add_(candidates * (1 - usage))
            size.mul_(usage.view(-1)).add_(torch.ones_like(size) * (1 - usage).view(-1))
        total = size.sum()
        smoothed = total * (size + self.eps) / (total + self.vocab_size * self.eps)  # Laplace, total kept
        self.book(c).weight.copy_(embed_sum / smoothed.view(-1, 1))

    @torch.no_grad()
    def restart_gradient_codebooks(self, residuals: list[torch.Tensor], indices: list[torch.Tensor]) -> None:
        """Gradient-learned codebooks: every code no residual of this batch chose jumps onto one of them."""
        for c in range(self.num_codebooks):
            depths = range(self.depth) if self.shared_codebook else [c]
            restart_dead_codes(self.book(c).weight, torch.cat([residuals[d] for d in depths]),
                               torch.cat([indices[d] for d in depths]))

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, dim={self.dim}, depth={self.depth}, "
                f"shared_codebook={self.shared_codebook}, beta={self.beta}, ema={self.ema}, "
                f"ema_decay={self.ema_decay}, restart_unused={self.restart_unused}, l2_norm={self.l2_norm}")


class RVQTokenizer(ConvTokenizer, ResidualTokenizer):
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

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → the quantiser's input (B, code_dim, h, w)."""
        return self.quant_conv(self.encoder(images))

    def quantize_images(self, images: torch.Tensor, *, update_codebook: bool = True,
                        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return self.quantize(self.latents(images), update_codebook=update_codebook)

    def depth_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (..., D′) → each depth's code vector (..., D′, code_dim), without gradient to the codebook."""
        return self.quantize.codes(indices).detach()

    def soft_codes(self, latents: torch.Tensor, *, temperature: float, stochastic: bool = True,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize.soft_codes(latents, temperature=temperature, stochastic=stochastic, generator=generator)

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
