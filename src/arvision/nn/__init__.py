"""Layers shared by two or more paradigms."""

from arvision.nn.attention import Attention, KVCache, causal_mask
from arvision.nn.blocks import DropPath, FeedForward, GeluMLP, LabelEmbedding, TransformerBlock, swiglu_hidden
from arvision.nn.norm import RMSNorm
from arvision.nn.rope import apply_rope, grid_positions, rope_2d, with_zero_prefix

__all__ = [
    "Attention", "DropPath", "FeedForward", "GeluMLP", "KVCache", "LabelEmbedding", "RMSNorm", "TransformerBlock",
    "apply_rope", "causal_mask", "grid_positions", "rope_2d", "swiglu_hidden", "with_zero_prefix",
]
