"""Multi-head self-attention on `F.scaled_dot_product_attention` with grouped KV heads and a KV cache.

Masks are boolean, True = may attend, over all keys the layer sees (cached ones first, then the new chunk),
broadcastable to (B, heads, q_len, k_len), or a FlexAttention `BlockMask` (see `nn/masks.py`) for structured
masks that should keep a fused kernel on GPU. `is_causal=True` means causal in absolute positions: without a
cache it is SDPA's own flag (flash kernels stay on); with a cache the new chunk sits at the end of the keys, so
a lower-right mask is built (none at all for a single query, which may see every key).

Two caches. `KVCache` is preallocated but hands back the keys written so far, `k[:, :, :length]`: a shape that grows
every step (fine eagerly; a compiled step would recompile or go dynamic). `StaticKVCache` is the fixed-shape one
for compiled / CUDA-graph decoding (gpt-fast's and HF's static cache): the new keys are written at a *position
tensor* with `index_copy_`, attention always runs over all `max_len` slots, and `position_mask` hides the slots
beyond the current position, so every step has the same shapes and the same tensor addresses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvision.nn.masks import flex_attention, is_block_mask
from arvision.nn.rope import apply_rope

_compiled_flex = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, *, enable_gqa: bool) -> torch.Tensor:
    """FlexAttention with a BlockMask: compiled on CUDA (a fused kernel), eager elsewhere (the unfused reference)."""
    global _compiled_flex
    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)  # dynamic after a 2nd shape (FlexVAR's schedules)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def causal_mask(q_len: int, k_len: int, *, device: torch.device | None = None) -> torch.Tensor:
    """Bool (q_len, k_len): query i, the (k_len - q_len + i)-th position, sees keys up to and including itself."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


class KVCache:
    """Keys and values of one attention layer, preallocated for `max_len` positions.

    Storage (B, kv_heads, max_len, head_dim) is allocated by the first `append` (so batch, dtype and device
    follow the activations, autocast included); later appends write in place. Fill it with a prefill of many
    tokens, then append chunk by chunk.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, kv_heads, n, head_dim); return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > max_len={self.max_len}")
        if self.k is None or self.v is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def position_mask(positions: torch.Tensor, max_len: int) -> torch.Tensor:
    """Bool (n, max_len) for queries at `positions` (n,) long: query i sees the slots 0 … positions[i] (causal in
    absolute positions; the static cache's unwritten slots beyond are hidden). A tensor op: no host sync."""
    return torch.arange(max_len, device=positions.device) <= positions[:, None]


class StaticSlot(NamedTuple):
    """A `StaticKVCache` bound to the positions of this step's queries (what `Attention` receives as `cache`)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv_heads, n, head_dim) at `positions` in place; return the whole storage. Stored in the
        storage's dtype: the autocast dtype that attention computes in (VAR's unit keys come out of autocast fp32)."""
        self.k.index_copy_(2, self.positions, k.to(self.k.dtype))
        self.v.index_copy_(2, self.positions, v.to(self.v.dtype))
        return self.k, self.v


class StaticKVCache:
    """Keys and values of one attention layer in fixed-shape storage (B, kv_heads, max_len, head_dim).

    Allocated up front (batch, dtype and device must be known: under autocast, the autocast dtype) and zero-filled:
    masked slots still enter the attention product with weight 0, and 0 · NaN from uninitialised memory would be
    NaN. The storage addresses never change (`mark_static_address`), so a CUDA graph can replay over them; `reset`
    zero-fills for the next run. Slots are written only at or before the step that reads them, so a reused cache
    needs no reset for correctness.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        self.max_len = max_len
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        for t in (self.k, self.v):
            torch._dynamo.mark_static_address(t)

    def at(self, positions: torch.Tensor) -> StaticSlot:
        """This step's view: its queries sit at `positions` (n,) long, on the storage's device."""
        return StaticSlot(self.k, self.v, positions)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class Attention(nn.Module):
    """Fused-QKV attention (LlamaGen/Llama layout: `wqkv`, `wo`, no biases); `kv_heads < heads` is GQA.
    `attn_dropout` drops attention probabilities in training (FlowAR/MAR's `attn_drop`); FlexAttention has no such
    dropout, so a training pass with it needs a dense mask. `bias=True` gives `wqkv` and `wo` biases (GPT-2's
    attention, as the RQ-Transformer's)."""

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, resid_dropout: float = 0.0,
                 attn_dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"need heads | dim and kv_heads | heads, got dim={dim} heads={heads} kv_heads={kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wqkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=bias)
        self.wo = nn.Linear(dim, dim, bias=bias)
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.attn_dropout = attn_dropout

    def forward(self, x: torch.Tensor, *, rope: torch.Tensor | None = None,
                cache: KVCache | StaticSlot | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x (B, L, dim) → (B, L, dim). `rope` (L, head_dim // 2, 2) holds the new tokens' positions."""
        if is_causal and attn_mask is not None:
            raise ValueError("pass either attn_mask or is_causal, not both")
        kv = self.kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.heads * self.head_dim, kv, kv], dim=-1)
        q = rearrange(q, "b l (h d) -> b h l d", h=self.heads)
        k = rearrange(k, "b l (h d) -> b h l d", h=self.kv_heads)
        v = rearrange(v, "b l (h d) -> b h l d", h=self.kv_heads)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if isinstance(cache, StaticSlot):  # fixed shapes: all max_len slots, the caller's position mask
            if is_causal:
                raise ValueError("a static cache attends over all its slots: pass position_mask(...) as attn_mask")
            k, v = cache.append(k, v)
        elif cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
            if is_causal and past:  # SDPA's is_causal aligns top-left, wrong once keys precede the chunk
                is_causal = False
                attn_mask = causal_mask(q.shape[2], k.shape[2], device=x.device) if q.shape[2] > 1 else None
        dropout_p = self.attn_dropout if self.training else 0.0
        if is_block_mask(attn_mask):
            if dropout_p:
                raise ValueError("FlexAttention has no attention dropout: train with a dense mask (attention=sdpa) "
                                 "or attn_dropout=0")
            out = flex(q, k, v, attn_mask, enable_gqa=self.kv_heads != self.heads)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 dropout_p=dropout_p, enable_gqa=self.kv_heads != self.heads)
        return self.resid_dropout(self.wo(rearrange(out, "b h l d -> b l (h d)")))
