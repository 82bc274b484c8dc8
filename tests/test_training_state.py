"""Pieces that make training resumable and correct: step sampler, EMA, optimiser groups, schedule."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from arvision.data.tokens import StepSampler, TokenDataset, compact, widen
from arvision.tasks.ema import EMA
from arvision.tasks.optim import param_groups, warmup_cosine


@given(st.integers(8, 60), st.integers(1, 8), st.integers(1, 30), st.integers(0, 29), st.integers(0, 5))
@settings(max_examples=40, deadline=None)
def test_resumed_sampler_replays_exactly_the_remaining_batches(n, batch, steps, k, seed):
    batch = min(batch, n)
    full = list(StepSampler(n, batch_size=batch, num_steps=steps, seed=seed))
    resumed = StepSampler(n, batch_size=batch, num_steps=steps, seed=seed)
    resumed.start_step = min(k, steps)
    tail = list(resumed)
    assert len(full) == steps and len(tail) == steps - min(k, steps)
    assert all(torch.equal(a, b) for a, b in zip(full[min(k, steps):], tail))


def test_sampler_epochs_are_permutations_and_ranks_split_the_global_batch(monkeypatch):
    n, batch, world = 24, 6, 2  # the global batch: 3 for each rank
    per_rank = []
    for rank in range(world):
        s = StepSampler(n, batch_size=batch, num_steps=4, seed=1)
        monkeypatch.setattr(s, "_world", lambda r=rank: (r, world))
        per_rank.append(list(s))
    epoch = torch.cat([torch.cat([per_rank[r][i] for r in range(world)]) for i in range(4)])
    assert sorted(epoch.tolist()) == list(range(n))  # 4 steps × 2 ranks × 3 = one epoch, no repeats


def test_token_dataset_gathers_batches_and_widens_compact_storage():
    tokens = compact(torch.randint(0, 500, (10, 4, 4)), vocab_size=512)
    assert tokens.dtype == torch.int16
    ds = TokenDataset(tokens, torch.arange(10))
    x, y = ds[torch.tensor([3, 1])]
    assert x.dtype == torch.long and torch.equal(x, widen(tokens[[3, 1]])) and y.tolist() == [3, 1]
    scales = [torch.randint(0, 9, (10, s, s)) for s in (1, 2)]
    xs, _ = TokenDataset(compact(scales, 9), torch.arange(10))[torch.tensor([0, 5])]
    assert [t.shape for t in xs] == [(2, 1, 1), (2, 2, 2)]


def test_ema_matches_the_closed_form():
    model = nn.Linear(2, 2, bias=False)
    ema = EMA(model, decay=0.9, warmup=False)
    start = model.weight.detach().clone()
    expected = start.clone()
    for step in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * model.weight.detach()
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_tracks_early_weights_closely():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9999)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first decay = (1 + 1) / (10 + 1): the average moves most of the way
    expected = 2 / 11 * start + 9 / 11
    torch.testing.assert_close(ema.module.weight, expected)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)  # then 3 / 12, rising towards the configured decay
    torch.testing.assert_close(ema.module.weight, 3 / 12 * expected + 9 / 12 * 2.0)


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Embedding(4, 3))
    decay, no_decay = param_groups(model, 0.05)
    assert {p.dim() for p in decay["params"]} == {2} and {p.dim() for p in no_decay["params"]} == {1}
    assert no_decay["weight_decay"] == 0.0


def test_warmup_cosine_schedule_shape():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(130):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert math.isclose(lrs[0], 0.1) and math.isclose(lrs[9], 1.0)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:111], lrs[11:111]))  # monotone decay
    assert math.isclose(lrs[110], 0.1, rel_tol=1e-6) and math.isclose(lrs[-1], 0.1, rel_tol=1e-6)


def test_adamw_skips_decay_for_what_a_generator_lists_in_no_weight_decay():
    from arvision.generators.base import Generator
    from arvision.tasks.optim import adamw

    class WithPositions(Generator):
        def __init__(self, keep_out: set[str]):
            super().__init__()
            self.keep_out = keep_out
            self.pos = nn.Parameter(torch.zeros(1, 4, 8))
            self.proj = nn.Linear(8, 8)

        def no_weight_decay(self):
            return self.keep_out

    decay, no_decay = adamw(WithPositions({"pos"}), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1).param_groups
    assert [p.shape for p in decay["params"]] == [(8, 8)] and decay["weight_decay"] == 0.1
    assert sorted(p.dim() for p in no_decay["params"]) == [1, 3] and no_decay["weight_decay"] == 0.0
    decay, _ = param_groups(WithPositions(set()), 0.1)  # nothing listed: the 3-D positions decay
    assert sorted(p.dim() for p in decay["params"]) == [2, 3]
