"""Top-k / top-p / temperature / CFG helpers: exact, small checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.generators.sampling import (apply_temperature, classifier_free_guidance, linear_cfg_schedule,
                                          sample_from_logits, top_k_filter, top_p_filter)

logit_rows = st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=2, max_size=40, unique=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine their spin-waits cost ~100×."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@settings(max_examples=50, deadline=None)
@given(row=logit_rows, k=st.integers(1, 40))
def test_top_k_keeps_exactly_k(row: list[float], k: int) -> None:
    logits = torch.tensor([row])
    kept = torch.isfinite(top_k_filter(logits, k))
    assert kept.sum().item() == min(k, len(row))
    # the kept ones are the largest (the logits are distinct, so the k largest are one set)
    largest = torch.zeros_like(kept).scatter(1, logits.topk(min(k, len(row)), dim=-1).indices, True)
    assert torch.equal(kept, largest)


def test_top_k_zero_is_off_and_input_untouched() -> None:
    logits = torch.randn(3, 10)
    before = logits.clone()
    assert torch.equal(top_k_filter(logits, 0), logits)
    top_k_filter(logits, 2)
    assert torch.equal(logits, before)


@settings(max_examples=80, deadline=None)
@given(row=logit_rows, p=st.floats(0.0, 0.999))
def test_top_p_smallest_prefix_with_mass_p(row: list[float], p: float) -> None:
    logits = torch.tensor([row], dtype=torch.float64)
    probs = logits.softmax(-1)[0]
    kept = torch.isfinite(top_p_filter(logits, p))[0]
    n = int(kept.sum())
    assert n >= 1
    # a prefix of the most likely tokens (compared on logits: distinct, while tiny gaps vanish in probabilities)
    assert torch.equal(kept, logits[0] >= logits[0].sort(descending=True).values[n - 1])
    mass = probs[kept].sum().item()
    assert mass >= p - 1e-9
    # smallest such prefix: without its least likely member it falls short of p
    assert mass - probs[kept].min().item() < p + 1e-9


def test_top_p_one_is_off() -> None:
    logits = torch.randn(4, 7)
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_known_case() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.9)).tolist() == [[True, True, True, False]]


def test_temperature_to_zero_is_argmax() -> None:
    logits = torch.randn(64, 50)
    gen = torch.Generator().manual_seed(0)
    argmax = logits.argmax(-1)
    assert torch.equal(sample_from_logits(logits, temperature=0.0), argmax)
    assert torch.equal(sample_from_logits(logits, temperature=1e-4, generator=gen), argmax)
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)


def test_sampling_respects_filters_and_seed() -> None:
    logits = torch.randn(256, 30)
    draw = lambda seed: sample_from_logits(logits, top_k=3, generator=torch.Generator().manual_seed(seed))
    tokens = draw(0)
    assert tokens.shape == (256,)
    assert (logits.gather(-1, tokens[:, None]) >= logits.topk(3, dim=-1).values[:, -1:]).all()
    assert torch.equal(tokens, draw(0))
    assert not torch.equal(tokens, draw(1))


def test_classifier_free_guidance() -> None:
    cond, uncond = torch.randn(2, 5), torch.randn(2, 5)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0), uncond)


def test_var_linear_ramp() -> None:
    scale, steps = 1.5, 10
    ramp = [linear_cfg_schedule(scale, k, steps) for k in range(steps)]
    assert ramp[0] == 0.0
    assert math.isclose(ramp[-1], scale)
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    # VAR's (1 + t)·cond − t·uncond is LlamaGen's formula with weight 1 + t
    cond, uncond, t = torch.randn(5), torch.randn(5), ramp[4]
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1 + t), (1 + t) * cond - t * uncond)
