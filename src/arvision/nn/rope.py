"""Rotary position embeddings: LlamaGen's 2D RoPE (`rope_2d`) and ACDiT's RopeND (`rope_nd`, at the end).

2D RoPE (LlamaGen's `precompute_freqs_cis_2d`, numerically identical).

A table holds (cos, sin) per position and channel pair: shape (L, head_dim // 2, 2). Channels are rotated in
adjacent pairs (0,1), (2,3), …; the first half of the pairs turns with the row index, the second half with the
column index, each with frequencies base^(-2j / (head_dim / 2)). Positions are given explicitly, so a caller can
repeat them (residual depth levels), scale them (multi-scale maps) or prefix all-zero rows (condition tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


# --- RopeND (ACDiT's `rope.py`) -----------------------------------------------------------------------------------
# A different layout from the table above: cos and sin per channel (L, head_dim, 2), not per pair. The head is cut
# into one run of channels per axis (2·split_j·⌊head_dim / (2·Σ split)⌋ channels for axis j); within axis j's run
# the frequencies base_j^(-linspace(0, head_dim, run/2)/head_dim) appear twice ([f, f]). The rotation pairs channel
# c with channel c + head_dim/2 across the whole head (Llama's rotate-half on the concatenated axes), so for a 2-D
# head the row run is paired with the column run: x'_c = x_c·cos_c − x_{c+h}·sin_c, x'_{c+h} = x_{c+h}·cos_{c+h} +
# x_c·sin_{c+h}, with cos_c from the row's angle and cos_{c+h} from the column's. That is what ACDiT's weights were
# trained with, so it is kept as is, not "fixed" to per-axis rotations.


def ropend_bases(max_lens: Sequence[int]) -> list[int]:
    """RopeND's automatic base per axis, (⌊8·L/π⌋ // 100 + 1)·100 for an axis of length L (100 up to L = 39)."""
    return [(int(8 * n / math.pi) // 100 + 1) * 100 for n in max_lens]


def rope_nd(positions: torch.Tensor, head_dim: int, *, max_lens: Sequence[int],
            nd_split: Sequence[int] | None = None) -> torch.Tensor:
    """cos/sin per channel (L, head_dim, 2) for integer `positions` (L, nd), axes of lengths `max_lens` (which set
    the bases), channels shared out by `nd_split` (default one share per axis; ACDiT's video model: 2, 3, 3)."""
    nd = positions.shape[1]
    split = list(nd_split) if nd_split is not None else [1] * nd
    if len(split) != nd or len(max_lens) != nd:
        raise ValueError(f"RopeND over {nd} axes needs {nd} max_lens and nd_split entries, got {list(max_lens)} "
                         f"and {split}")
    unit = head_dim // 2 // sum(split)
    runs = [2 * s * unit for s in split]
    if sum(runs) != head_dim:
        raise ValueError(f"RopeND cannot share head_dim {head_dim} among the axes as {split}: use a head_dim that "
                         f"is a multiple of {2 * sum(split)}")
    angles = []
    for axis, (run, base) in enumerate(zip(runs, ropend_bases(max_lens))):
        # fp32 throughout, in the official order of operations, so the table matches RopeND's to the bit
        inv_freq = 1.0 / (base ** (torch.linspace(0, head_dim, run // 2).float() / head_dim))
        freqs = torch.outer(positions[:, axis].float(), inv_freq)
        angles.append(torch.cat([freqs, freqs], dim=-1))
    angle = torch.cat(angles, dim=-1)
    return torch.stack([angle.cos(), angle.sin()], dim=-1)


def apply_rope_nd(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., L, head_dim) by a `rope_nd` table (L, head_dim, 2); fp32 inside, x's dtype out."""
    xf = x.float()
    half = xf.shape[-1] // 2
    cos, sin = table.float().unbind(-1)
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).type_as(x)
