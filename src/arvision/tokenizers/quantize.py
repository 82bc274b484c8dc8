"""Vector-quantisation maths shared by the discrete tokenizers.

`VectorQuantizer` is LlamaGen's quantiser: codes and inputs optionally l2-normalised (cosine lookup), the
codebook learned by gradient (codebook loss ‖sg(z) − e‖²), commitment β‖z − sg(e)‖², straight-through
gradients `z + sg(e − z)`. Residual and multi-scale quantisers reuse `nearest_code` and the usage statistics.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Indices of the nearest codebook rows (squared L2) for each row of `z` (N, d) → (N,)."""
    # ‖z‖² − 2 z·e + ‖e‖²; ‖z‖² is constant per row and dropped.
    distances = codebook.pow(2).sum(1) - 2 * z @ codebook.t()
    return distances.argmin(dim=1)


def usage_and_perplexity(indices: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of codes used and exp(entropy) of the code histogram, over one batch of indices."""
    counts = torch.bincount(indices.flatten(), minlength=vocab_size).float()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return (counts > 0).float().mean(), entropy.exp()


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def random_rows(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """k random rows of `vectors` (N, d), identical on every rank (rank 0's draw)."""
    n, d = vectors.shape
    if n < k:
        # Fewer vectors than codes: tile them, with a little noise so that copies do not coincide.
        vectors = vectors.repeat(math.ceil(k / n), 1)
        vectors = vectors + torch.randn_like(vectors) * (0.01 / math.sqrt(d))
    rows = vectors[torch.randperm(vectors.shape[0], device=vectors.device)[:k]].contiguous()
    if distributed():
        dist.broadcast(rows, 0)
    return rows


@torch.no_grad()
def restart_dead_codes(weight: torch.Tensor, vectors: torch.Tensor, indices: torch.Tensor,
                       idle_steps: torch.Tensor | None = None, patience: int = 1) -> torch.Tensor:
    """Re-seed every dead code with a random row of `vectors` (in place); returns the dead-code mask.

    Without `idle_steps`, a code is dead when no vector of this batch chose it. With `idle_steps` (a long buffer
    of one counter per code, updated here) it is dead after `patience` batches in a row without a choice: codes
    that only sparse inputs pick (VAR's 1×1 scale is one vector per image) then survive a batch that misses them,
    instead of being thrown back among the dense ones (vector-quantize-pytorch's `threshold_ema_dead_code` is
    the EMA form of the same idea).

    For gradient-learned codebooks: a dead code got no gradient this step, and quantisation saves only indices
    (or, for the cosine lookup, a row-wise normalisation whose unused rows get zero gradient), so overwriting its
    row after the forward leaves this step's backward exact. Counts are summed over ranks (no host sync).
    """
    counts = torch.bincount(indices.flatten(), minlength=weight.shape[0])
    if distributed():
        dist.all_reduce(counts)
    if idle_steps is None:
        dead = counts == 0
    else:
        idle_steps.copy_(torch.where(counts > 0, torch.zeros_like(idle_steps), idle_steps + 1))
        dead = idle_steps >= patience
        idle_steps.masked_fill_(dead, 0)  # a re-seeded code gets a fresh patience
    weight.data.copy_(torch.where(dead[:, None], random_rows(vectors.detach().to(weight.dtype), weight.shape[0]),
                                  weight.data))
    return dead


def balanced_rows(groups: list[torch.Tensor], k: int) -> torch.Tensor:
    """k candidate rows drawn evenly from every group (e.g. one group per scale), not in proportion to its size.

    Pooling VAR's scales as they come would draw 64 of every 155 restart candidates from the 8×8 scale and 1 from
    the 1×1 scale; drawing `k` from each group first gives every scale the same share.
    """
    return torch.cat([random_rows(g.detach(), k) for g in groups])


class VectorQuantizer(nn.Module):
    def __init__(self, *, vocab_size: int, dim: int, beta: float = 0.25, l2_norm: bool = True,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01,
                 restart_unused: bool = False) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.restart_unused = restart_unused
        self.dim = dim
        self.beta = beta
        self.l2_norm = l2_norm
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.embedding = nn.Embedding(vocab_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / vocab_size, 1.0 / vocab_size)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z (B, dim, h, w) → (straight-through z_q (B, dim, h, w), indices (B, h, w), losses and stats)."""
        b, _, h, w = z.shape
        z = rearrange(z, "b c h w -> (b h w) c")
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        codebook = self.codebook()
        indices = nearest_code(z.detach(), codebook.detach())
        z_q = codebook[indices]
        losses = {
            "codebook_loss": F.mse_loss(z_q, z.detach()),
            "commit_loss": self.beta * F.mse_loss(z, z_q.detach()),
        }
        if self.entropy_weight > 0:
            losses["entropy_loss"] = self.entropy_weight * self.entropy_loss(z, codebook)
        if self.training and self.restart_unused:
            restart_dead_codes(self.embedding.weight, z, indices)  # dead codes jump onto this batch's latents
        z_q = z + (z_q - z).detach()  # straight-through estimator
        usage, perplexity = usage_and_perplexity(indices, self.vocab_size)
        stats = {"usage": usage, "perplexity": perplexity}
        z_q = rearrange(z_q, "(b h w) c -> b c h w", b=b, h=h, w=w)
        return z_q, indices.view(b, h, w), {**losses, **stats}

    def entropy_loss(self, z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """LlamaGen's optional entropy penalty: confident per-sample assignments, diverse on average."""
        logits = -(codebook.pow(2).sum(1) - 2 * z @ codebook.t()) / self.entropy_temperature
        probs = logits.softmax(-1)
        per_sample = -(probs * logits.log_softmax(-1)).sum(-1).mean()
        avg = probs.mean(0)
        codebook_entropy = -(avg * torch.log(avg.clamp_min(1e-12))).sum()
        return per_sample - codebook_entropy

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) → codes (B, dim, h, w)."""
        return rearrange(self.codebook()[indices], "b h w c -> b c h w")

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, dim={self.dim}, beta={self.beta}, l2_norm={self.l2_norm}, "
                f"restart_unused={self.restart_unused}")


__all__ = ["VectorQuantizer", "balanced_rows", "nearest_code", "random_rows", "restart_dead_codes",
           "usage_and_perplexity"]
