"""Structured attention masks, as dense booleans (the CPU/reference path) and as FlexAttention block masks (GPU).

Convention everywhere: True = the query may attend to the key. A *segment* is a run of consecutive positions that
are generated together (one VAR/FlowAR scale, one ACDiT block); `segment_ids` gives each position its segment.

The dense mask goes to `F.scaled_dot_product_attention` (any device, exact, but on GPU a dense mask rules out the
flash kernel). The block mask goes to `flex_attention`, which skips fully masked tiles and keeps a fused kernel
once compiled; on CPU eager it falls back to an unfused reference (slow, same numbers). `Attention` dispatches on
the type of the mask it is given, so a model switches paths by building one or the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

try:  # FlexAttention (torch ≥ 2.5)
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: dense masks only
    BlockMask, create_block_mask, flex_attention = None, None, None

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def segment_ids(lengths: Sequence[int], *, device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) long: the segment index of every position, for segments of the given lengths laid end to end."""
    if any(n <= 0 for n in lengths):
        raise ValueError(f"segment lengths must be positive, got {list(lengths)}")
    # Filled on the device: no host data copied there (on CUDA a blocking copy waits for the stream).
    return torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(lengths)])


def block_causal_mask(lengths: Sequence[int], *, device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) bool: a position sees every position of its own segment and of all earlier segments (VAR, FlowAR)."""
    seg = segment_ids(lengths, device=device)
    return seg[:, None] >= seg[None, :]


def block_causal_mask_mod(seg: torch.Tensor) -> MaskMod:
    """The same rule as a FlexAttention mask_mod over a (L,) segment-id tensor."""
    def mask_mod(b, h, q_idx, kv_idx):
        return seg[q_idx] >= seg[kv_idx]
    return mask_mod


def dense_from_mask_mod(mask_mod: MaskMod, q_len: int, kv_len: int, *,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Evaluate a mask_mod on the full (q_len, kv_len) grid: the dense reference for any block mask."""
    q = torch.arange(q_len, device=device)[:, None]
    kv = torch.arange(kv_len, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mask_mod(zero, zero, q, kv).expand(q_len, kv_len).clone()


def flex_available() -> bool:
    return flex_attention is not None


def flex_block_mask(mask_mod: MaskMod, q_len: int, kv_len: int, *,
                    device: torch.device | str | None = None) -> BlockMask:
    """A FlexAttention BlockMask shared by batch and heads (build once per sequence layout, reuse every step)."""
    if not flex_available():
        raise RuntimeError("FlexAttention needs torch >= 2.5; use the dense mask (attention=sdpa)")
    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=str(device or "cpu"))


def use_flex(mode: str, device: torch.device | str) -> bool:
    """`attention` switch of the models: "sdpa" (dense mask), "flex" (block mask), "auto" = flex on CUDA only
    (FlexAttention has no CPU backward, and its CPU eager path is the unfused reference)."""
    if mode not in ("auto", "sdpa", "flex"):
        raise ValueError(f"attention must be auto, sdpa or flex, got {mode!r}")
    return mode == "flex" or (mode == "auto" and torch.device(device).type == "cuda" and flex_available())


def is_block_mask(mask: object) -> bool:
    return BlockMask is not None and isinstance(mask, BlockMask)
