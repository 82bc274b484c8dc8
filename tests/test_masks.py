"""Structured masks: the dense and FlexAttention forms are the same rule, and attention through either agrees."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.nn import Attention
from arvision.nn.masks import (block_causal_mask, block_causal_mask_mod, dense_from_mask_mod, flex_block_mask,
                               segment_ids)

lengths_strategy = st.lists(st.integers(1, 9), min_size=1, max_size=6)


@given(lengths_strategy)
@settings(max_examples=40, deadline=None)
def test_block_causal_mask_sees_own_and_earlier_segments_only(lengths):
    mask = block_causal_mask(lengths)
    seg = segment_ids(lengths)
    assert mask.shape == (sum(lengths), sum(lengths))
    for i in range(len(seg)):
        for j in range(len(seg)):
            assert bool(mask[i, j]) == bool(seg[j] <= seg[i])
    # one segment = full attention; segments of length one = the ordinary causal mask
    assert block_causal_mask([len(seg)]).all()
    assert torch.equal(block_causal_mask([1] * 7), torch.ones(7, 7, dtype=torch.bool).tril())


def test_mask_mod_evaluates_to_the_dense_mask():
    lengths = [1, 4, 9, 16]
    seg = segment_ids(lengths)
    assert torch.equal(dense_from_mask_mod(block_causal_mask_mod(seg), 30, 30), block_causal_mask(lengths))


@torch.no_grad()  # FlexAttention has no CPU backward; on GPU it trains
def test_attention_with_a_block_mask_equals_attention_with_the_dense_mask():
    torch.manual_seed(0)
    lengths = [1, 4, 9, 16, 36]
    n = sum(lengths)
    attn = Attention(32, 4, kv_heads=2)
    x = torch.randn(2, n, 32)
    dense = attn(x, attn_mask=block_causal_mask(lengths))
    flex = attn(x, attn_mask=flex_block_mask(block_causal_mask_mod(segment_ids(lengths)), n, n))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    # and the mask matters: full attention gives something else
    assert not torch.allclose(attn(x), dense, atol=1e-3)
