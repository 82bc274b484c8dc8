"""2D rotary position embedding (LlamaGen's `precompute_freqs_cis_2d`, numerically identical).

A table holds (cos, sin) per position and channel pair: shape (L, head_dim // 2, 2). Channels are rotated in
adjacent pairs (0,1), (2,3), …; the first half of the pairs turns with the row index, the second half with the
column index, each with frequencies base^(-2j / (head_dim / 2)). Positions are given explicitly, so a caller can
repeat them (residual depth levels), scale them (multi-scale maps) or prefix all-zero rows (condition tokens).
"""

from __future__ import annotations

import torch
from einops import rearrange


def grid_positions(h: int, w: int) -> torch.Tensor:
    """(row, col) of an h×w map in raster order: FloatTensor (h·w, 2)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()


def rope_2d(positions: torch.Tensor, head_dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """cos/sin table (L, head_dim // 2, 2) for `positions` (L, 2) = (row, col)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2  # channels per axis
    freqs = 1.0 / base ** (torch.arange(0, half, 2).float() / half)  # (head_dim // 4,)
    angles = torch.cat([torch.outer(positions[:, 0].float(), freqs),
                        torch.outer(positions[:, 1].float(), freqs)], dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def with_zero_prefix(table: torch.Tensor, n: int) -> torch.Tensor:
    """Prepend `n` all-zero rows for condition tokens: RoPE then zeroes their q and k (LlamaGen's class slot;
    their content still flows through values and the residual stream). Kept so LlamaGen checkpoints load."""
    return torch.cat([table.new_zeros(n, *table.shape[1:]), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., L, head_dim) by table (L, head_dim // 2, 2); computed in fp32, returned in x's dtype."""
    pairs = rearrange(x.float(), "... (d two) -> ... d two", two=2)
    x0, x1 = pairs.unbind(-1)
    cos, sin = table.float().unbind(-1)
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return rearrange(rotated, "... d two -> ... (d two)").type_as(x)
