"""Llama-style building blocks: SwiGLU feed-forward, drop-path, pre-norm transformer block (or its GPT-2 form),
class embedding, and DiT's timestep embedder (shared by the flow and diffusion generators)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arvision.nn.attention import Attention, KVCache
from arvision.nn.norm import RMSNorm


def swiglu_hidden(dim: int) -> int:
    """Llama's SwiGLU width 2·4d/3 rounded up to a multiple of 256 (64 below d = 512, so tiny models stay tiny)."""
    multiple = 256 if dim >= 512 else 64
    hidden = int(2 * 4 * dim / 3)
    return -(-hidden // multiple) * multiple


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x), no biases."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class GeluMLP(nn.Module):
    """GPT-2's feed-forward: fc2(gelu(fc1 x)), with biases and the exact (erf) GELU, as the RQ-Transformer's `mlp`."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


BLOCK_STYLES = ("llama", "gpt2")


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescale the kept ones by 1 / (1 - p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)). Submodule names follow LlamaGen's checkpoints.

    `style="llama"`: RMSNorm, bias-free attention, SwiGLU. `style="gpt2"`: LayerNorm, attention with biases and a
    4×-wide GELU MLP with biases (the RQ-Transformer's blocks)."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, ffn_hidden: int | None = None,
                 resid_dropout: float = 0.0, ffn_dropout: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-5, style: str = "llama") -> None:
        super().__init__()
        if style not in BLOCK_STYLES:
            raise ValueError(f"block style must be one of {BLOCK_STYLES}, got {style!r}")
        gpt2 = style == "gpt2"
        norm = (lambda: nn.LayerNorm(dim, eps=norm_eps)) if gpt2 else (lambda: RMSNorm(dim, eps=norm_eps))
        self.attention_norm = norm()
        self.attention = Attention(dim, heads, kv_heads=kv_heads, resid_dropout=resid_dropout, bias=gpt2)
        self.ffn_norm = norm()
        self.feed_forward = (GeluMLP(dim, ffn_hidden or 4 * dim, dropout=ffn_dropout) if gpt2 else
                             FeedForward(dim, ffn_hidden or swiglu_hidden(dim), dropout=ffn_dropout))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, *, rope: torch.Tensor | None = None, cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.attention_norm(x), rope=rope, cache=cache,
                                              attn_mask=attn_mask, is_causal=is_causal))
        return x + self.drop_path(self.feed_forward(self.ffn_norm(x)))


class LabelEmbedding(nn.Module):
    """Class embedding with a null class (row `num_classes`) for classifier-free guidance.

    In training mode each label is replaced by the null class with probability `dropout`. `null_class=False`
    keeps only the `num_classes` rows (a model trained without CFG, as the RQ-Transformer); dropout is then 0.
    """

    def __init__(self, num_classes: int, dim: int, *, dropout: float = 0.1, null_class: bool = True) -> None:
        super().__init__()
        if not null_class and dropout:
            raise ValueError(f"class dropout {dropout} needs a null class to drop labels to (null_class=true)")
        self.num_classes, self.dropout, self.null_class = num_classes, dropout, null_class
        self.embedding_table = nn.Embedding(num_classes + int(null_class), dim)

    def drop(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout == 0.0:
            return labels
        dropped = torch.rand(labels.shape, device=labels.device) < self.dropout
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(self.drop(labels))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT/MAR sinusoidal features of (integer or fractional) times t (...,) → (..., dim): [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: sinusoidal features of t, then Linear → SiLU → Linear (keys `mlp.0`, `mlp.2`)."""

    def __init__(self, dim: int, *, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (...) → (..., dim)."""
        return self.mlp(timestep_embedding(t, self.freq_dim, self.max_period))
