"""NextScaleGenerator: VAR (msvq, residual) and FlexVAR (vq, residual=false) next-scale prediction."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.generators import IncompatibleTokenizer
from arvision.generators.next_scale import NextScaleGenerator, flexvar_schedule, smooth_codes, var_schedule
from arvision.generators.sampling import top_k_filter, top_p_filter
from arvision.nn.masks import is_block_mask, segment_ids
from arvision.tokenizers.base import TokenSpec
from arvision.tokenizers.msvq import MultiScaleVQTokenizer
from arvision.tokenizers.vq import VQTokenizer
from tests.conftest import untrained_test_loss

NUM_CLASSES = 10
NET = dict(image_size=16, image_channels=1, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
           code_dim=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def msvq() -> MultiScaleVQTokenizer:
    torch.manual_seed(0)
    tok = MultiScaleVQTokenizer(**NET, scales=(1, 2, 3, 4))  # 4×4 latent, K = 4, L = 30
    torch.nn.init.normal_(tok.quantize.embedding.weight)  # distinct codes, so the inputs carry information
    return tok.eval()


@functools.cache
def vq() -> VQTokenizer:
    torch.manual_seed(0)
    tok = VQTokenizer(**NET)
    torch.nn.init.normal_(tok.quantize.embedding.weight)
    return tok.eval()


def make(residual: bool = True, *, seed: int = 0, **kwargs) -> NextScaleGenerator:
    tok = msvq() if residual else vq()
    torch.manual_seed(seed)
    kwargs = {"depth": 2, "dim": 32, "heads": 2, "residual": residual, "cond_drop_rate": 0.0, **kwargs}
    model = NextScaleGenerator(spec=tok.spec, num_classes=NUM_CLASSES, **kwargs).attach_tokenizer(tok)
    with torch.no_grad():  # VAR's init makes every block and the head near-silent: wake them up for the tests
        for block in model.blocks:
            block.ada_lin[-1].weight.normal_(std=0.3)
        model.head.weight.normal_(std=0.5)
    return model.eval()


@functools.cache
def shared(residual: bool = True) -> NextScaleGenerator:
    return make(residual)


def tokens_for(model: NextScaleGenerator, b: int = 3, seed: int = 0):
    """Random training tokens: VAR's K maps, FlexVAR's one map per side 1..side (ground_truth=continuous) or grid."""
    gen = torch.Generator().manual_seed(seed)
    v = model.spec.vocab_size
    if model.residual:
        return [torch.randint(0, v, (b, n, n), generator=gen) for n in model.scales]
    if model.ground_truth == "continuous":
        return [torch.randint(0, v, (b, n, n), generator=gen) for n in range(1, model.side + 1)]
    return torch.randint(0, v, (b, model.side, model.side), generator=gen)


def labels_for(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (b,), generator=torch.Generator().manual_seed(seed + 1))


class HeadCalls:
    """Records every output of the head (one per forward pass: the raw logits of that pass's tokens)."""

    def __init__(self, model: NextScaleGenerator) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = model.head.register_forward_hook(lambda mod, inp, out: self.outputs.append(out.float()))

    def __enter__(self) -> HeadCalls:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def greedy_maps_and_logits(model, labels, *, cfg=1.0, schedule=None, cfg_schedule="linear"):
    """Greedy sampling; returns the per-scale maps actually fed back and the raw per-pass logits."""
    with HeadCalls(model) as calls:
        out = model.sample(labels, cfg=cfg, temperature=0.0, schedule=schedule, cfg_schedule=cfg_schedule)
    schedule = tuple(schedule or model.scales)
    b = labels.shape[0]
    maps = []
    for k, (n, raw) in enumerate(zip(schedule, calls.outputs)):
        logits = raw
        if cfg != 1.0:
            t = model.guidance(cfg, k, schedule, cfg_schedule)
            logits = (1 + t) * raw[:b] - t * raw[b:]
        maps.append(logits.argmax(-1).view(b, n, n))
    return out, maps, calls.outputs


def flex_teacher_inputs(model: NextScaleGenerator, maps: list[torch.Tensor], schedule) -> torch.Tensor:
    """FlexVAR teacher forcing from given per-scale maps: codes of scale k, bicubic-upsampled to n_{k+1}."""
    codebook = model.tokenizer_on("cpu").quantize.codebook()
    inputs = [model.flex_input(codebook[m].permute(0, 3, 1, 2), n) for m, n in zip(maps[:-1], schedule[1:])]
    return torch.cat(inputs, dim=1)


# ------------------------------------------------------------------------------------------------ sampling ≡ TF
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cached_var_sampling_reproduces_teacher_forced_logits(cfg: float) -> None:
    """Each cached pass (only the new scale's tokens) gives the teacher-forced logits of the same tokens."""
    model = shared(True)
    labels = labels_for(2)
    out, maps, raw = greedy_maps_and_logits(model, labels, cfg=cfg)
    assert [m.shape for m in out] == [(2, n, n) for n in model.scales]
    for got, expected in zip(out, maps):  # the sampler fed back exactly the guided argmax
        assert torch.equal(got, expected)
    with torch.no_grad():
        cond = model(out, labels)
        null = model(out, torch.full_like(labels, NUM_CLASSES))
    start = 0
    for k, n in enumerate(model.scales):
        step = raw[k]
        torch.testing.assert_close(step[:2], cond[:, start:start + n * n], atol=1e-4, rtol=1e-4)
        if cfg != 1.0:
            torch.testing.assert_close(step[2:], null[:, start:start + n * n], atol=1e-4, rtol=1e-4)
        start += n * n


@pytest.mark.parametrize("schedule", [None, (1, 2, 4), (1, 2, 3, 4), (1, 3, 4)])
def test_cached_flexvar_sampling_reproduces_teacher_forced_logits(schedule) -> None:
    model = shared(False)
    labels = labels_for(2, seed=3)
    grid, maps, raw = greedy_maps_and_logits(model, labels, cfg=2.5, schedule=schedule)
    schedule = tuple(schedule or model.scales)
    assert torch.equal(grid, maps[-1]) and grid.shape == (2, 4, 4)
    with torch.no_grad():
        cond = model.logits(flex_teacher_inputs(model, maps, schedule), labels, schedule)
    start = 0
    for k, n in enumerate(schedule):
        torch.testing.assert_close(raw[k][:2], cond[:, start:start + n * n], atol=1e-4, rtol=1e-4)
        start += n * n


# ------------------------------------------------------------------------------------------------ masks
@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=5, unique=True))
def test_dense_mask_is_exactly_block_causal(sides: list[int]) -> None:
    model = shared(False)
    schedule = tuple(sorted(sides))
    mask = model.attn_mask(schedule, torch.device("cpu"))
    seg = segment_ids([n * n for n in schedule])
    length = sum(n * n for n in schedule)
    assert mask.shape == (length, length) and mask.dtype == torch.bool
    i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    assert torch.equal(mask, seg[j] <= seg[i])
    assert model.attn_mask(schedule, torch.device("cpu")) is mask  # built once per schedule


@settings(max_examples=10, deadline=None)
@given(k=st.integers(0, 3), position=st.integers(0, 15))
def test_teacher_forced_logits_see_only_coarser_scales(k: int, position: int) -> None:
    """Changing scale k's tokens leaves the logits of scales ≤ k unchanged and changes scale k + 1's."""
    model = shared(True)
    tokens, labels = tokens_for(model), labels_for()
    n = model.scales[k]
    changed = [t.clone() for t in tokens]
    flat = changed[k].view(3, -1)
    flat[:, position % (n * n)] = (flat[:, position % (n * n)] + 1) % model.spec.vocab_size
    with torch.no_grad():
        a, b = model(tokens, labels), model(changed, labels)
    upto = sum(s * s for s in model.scales[:k + 1])
    torch.testing.assert_close(a[:, :upto], b[:, :upto], atol=1e-6, rtol=0)
    if k + 1 < len(model.scales):
        after = upto + model.scales[k + 1] ** 2
        assert not torch.allclose(a[:, upto:after], b[:, upto:after], atol=1e-5)


@torch.no_grad()  # FlexAttention has no CPU backward
@pytest.mark.parametrize("residual", [True, False])
def test_flex_and_dense_attention_give_the_same_teacher_forced_logits(residual: bool) -> None:
    model = make(residual, attention="sdpa")
    tokens, labels = tokens_for(model), labels_for()
    dense = model(tokens, labels)
    model.attention = "flex"
    schedule = model.scales
    assert is_block_mask(model.attn_mask(schedule, torch.device("cpu")))
    torch.testing.assert_close(model(tokens, labels), dense, atol=1e-5, rtol=1e-5)
    model.attention = "auto"  # on CPU: the dense mask
    assert not is_block_mask(model.attn_mask(schedule, torch.device("cpu")))


# ------------------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("residual, cfg", [(True, 1.0), (True, 2.5), (False, 3.0)])
def test_one_forward_pass_per_scale(residual: bool, cfg: float) -> None:
    model = shared(residual)
    with HeadCalls(model) as calls:
        model.sample(torch.arange(3), cfg=cfg, generator=torch.Generator().manual_seed(0), top_k=8, top_p=0.9)
    factor = 1 if cfg == 1.0 else 2
    assert [o.shape[:2] for o in calls.outputs] == [(3 * factor, n * n) for n in model.scales]
    k = len(model.scales)
    assert model.sampling_cost(cfg=cfg).to_dict() == {"passes": k, "backbone_passes": k, "head_passes": 0,
                                                      "rows_per_pass_factor": factor}


@pytest.mark.parametrize("schedule", [None, (1, 4), (1, 2, 3, 4)])
def test_flexvar_sampling_cost_counts_the_schedule_it_samples(schedule) -> None:
    model = shared(False)
    with HeadCalls(model) as calls:
        model.sample(torch.arange(2), cfg=2.0, schedule=schedule, generator=torch.Generator().manual_seed(0))
    cost = model.sampling_cost(cfg=2.0, schedule=schedule)
    assert cost.passes == cost.backbone_passes == len(calls.outputs) == len(schedule or model.scales)


def test_cfg_ramp_values() -> None:
    g = shared(True).guidance
    schedule = shared(True).scales  # 4 scales
    # VAR's cfg 1.5 is cfg 2.5 here: t ramps 0 → 1.5, the guided logits are (1 + t)·c − t·u
    for name in ("linear", "linear_to_last"):  # the same for schedules no longer than the default one
        assert [g(2.5, k, schedule, name) for k in range(4)] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert [g(2.5, k, schedule, "constant") for k in range(4)] == [1.5] * 4
    assert [g(1.0, k, schedule, "linear") for k in range(4)] == [0.0] * 4  # cfg 1: unguided
    with pytest.raises(ValueError, match="cfg_schedule"):
        shared().sample(torch.arange(2), cfg=1.0, cfg_schedule="cosine")


def flex_at_side_16() -> NextScaleGenerator:
    """FlexVAR at ImageNet-256's grid: the default schedule is VAR's 10 steps (K₀ = 10)."""
    spec = TokenSpec(name="vq", kind="discrete", layout="grid", grid=(16, 16), dim=4, vocab_size=16,
                     has_codebook=True)
    return NextScaleGenerator(spec=spec, num_classes=NUM_CLASSES, depth=1, dim=32, heads=2, residual=False)


def test_flexvar_cfg_ramp_keeps_the_default_slope_and_takes_full_cfg_above_the_grid() -> None:
    """FlexVAR's `autoregressive_infer_cfg`: t = cfg·k/min(K − 1, 9), t = cfg at sides above max_pn (= 16); VAR's
    cfg is cfg − 1 here."""
    model = flex_at_side_16()
    assert model.scales == var_schedule(16) and len(model.scales) == 10
    nine = (1, 2, 3, 4, 5, 7, 10, 13, 16)  # README's 9-step schedule: VAR's ramp over 9 steps
    assert [model.guidance(3.5, k, nine, "linear") for k in range(9)] == pytest.approx([2.5 * k / 8 for k in range(9)])
    thirteen = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16)  # zero-shot 13 steps: slope 1/9, past cfg − 1 at the end
    assert [model.guidance(3.5, k, thirteen, "linear") for k in range(13)] == pytest.approx(
        [2.5 * k / 9 for k in range(13)])
    assert [model.guidance(3.5, k, thirteen, "linear_to_last") for k in range(13)] == pytest.approx(
        [2.5 * k / 12 for k in range(13)])
    at_512 = (*thirteen, 23, 32)  # 512 px: sides above the grid take the full cfg − 1
    assert [model.guidance(4.0, k, at_512, "linear") for k in range(15)] == pytest.approx(
        [3.0 * k / 9 for k in range(13)] + [3.0, 3.0])


def test_flexvar_draws_sides_off_the_default_schedule_greedily() -> None:
    model = flex_at_side_16()
    off = [n for n in range(1, 33) if model.draw_top_k(n, 900, True) == 1]
    assert off == [7, 9, 11, 12, 14, 15, *range(17, 33)]  # FlexVAR: not in 1,2,3,4,5,6,8,10,13,16, or > max_pn 16
    assert all(model.draw_top_k(n, 900, False) == 900 for n in range(1, 33))


def test_greedy_off_grid_sampling(monkeypatch) -> None:
    """Trained on (1, 2, 4): side 3 and the sides beyond the grid are drawn with top-k 1, the others as asked."""
    import arvision.generators.next_scale as ns

    model = make(False, scales=(1, 2, 4), random_schedules=False)
    draws, original = [], ns.sample_from_logits

    def recording(logits, **kwargs):
        out = original(logits, **kwargs)
        draws.append((logits.clone(), kwargs["top_k"], out))
        return out

    monkeypatch.setattr(ns, "sample_from_logits", recording)
    grid = model.sample(torch.arange(2), cfg=2.0, top_k=5, schedule=(1, 2, 3, 4, 6, 8),
                        generator=torch.Generator().manual_seed(0))
    assert grid.shape == (2, 8, 8) and vq().decode(grid).shape == (2, 1, 32, 32)  # extrapolated: a larger image
    assert [top_k for _, top_k, _ in draws] == [5, 5, 1, 5, 1, 1]
    for logits, top_k, out in draws:
        if top_k == 1:
            assert torch.equal(out, logits.argmax(-1))
    draws.clear()
    model.sample(torch.arange(2), cfg=2.0, top_k=5, schedule=(1, 2, 3, 4), greedy_off_grid=False)
    assert [top_k for _, top_k, _ in draws] == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="editing keeps tokens of the 4×4 grid: its schedule must end at side 4"):
        model.edit(torch.arange(2), vq().encode(torch.zeros(2, 1, 16, 16)), torch.zeros(4, 4, dtype=torch.bool),
                   schedule=(1, 2, 3, 4, 6, 8))


@pytest.mark.parametrize("cfg_schedule", ["linear", "constant"])
def test_guided_sampling_uses_the_ramp(cfg_schedule: str) -> None:
    """The sampler picks argmax((1 + t_k)·cond − t_k·uncond) at every scale (VAR: the first scale unguided)."""
    model = shared(True)
    labels = labels_for(4)
    out, maps, _ = greedy_maps_and_logits(model, labels, cfg=4.0, cfg_schedule=cfg_schedule)
    assert all(torch.equal(a, b) for a, b in zip(out, maps))
    # the linear ramp leaves the first scale unguided, the constant one does not
    unguided = model.sample(labels, cfg=1.0, temperature=0.0)
    assert torch.equal(out[0], unguided[0]) == (cfg_schedule == "linear")
    assert not all(torch.equal(a, b) for a, b in zip(out, unguided))


# ------------------------------------------------------------------------------------------------ more_smooth
def test_smooth_codes_is_vars_gumbel_softmax_mix_of_the_codebook() -> None:
    """softmax((logits·(1 + r) − log E) / τ) @ codebook, E ~ Exp(1) from the generator, τ = max(0.27·(1 − 0.95r),
    0.005); codes outside the kept set get no weight."""
    torch.manual_seed(0)
    logits, codebook = torch.randn(2, 5, 16) * 3, torch.randn(16, 4)
    logits[..., 8:] = float("-inf")  # filtered out by top-k / top-p
    for ratio, tau in [(0.0, 0.27), (0.5, 0.27 * (1 - 0.475)), (1.0, 0.27 * 0.05)]:
        got = smooth_codes(logits, codebook, ratio=ratio, generator=torch.Generator().manual_seed(3))
        noise = torch.empty(2, 5, 16).exponential_(generator=torch.Generator().manual_seed(3))
        weights = torch.softmax((logits * (1 + ratio) - noise.log()) / tau, dim=-1)
        assert weights[..., 8:].sum() == 0 and torch.allclose(weights.sum(-1), torch.ones(2, 5))
        torch.testing.assert_close(got, weights @ codebook)
    # one kept code: the mix is that code exactly
    one = torch.full((1, 1, 16), float("-inf"))
    one[..., 5] = 0.0
    assert torch.equal(smooth_codes(one, codebook, ratio=0.3), codebook[5][None, None])
    # the temperature floor: late scales with a tiny τ still give finite mixes
    assert torch.isfinite(smooth_codes(logits * 100, codebook, ratio=1.0)).all()


def test_more_smooth_feeds_each_scale_the_codebook_mix_drawn_after_the_token() -> None:
    """Replays the sampler: at each scale VAR draws the token (one Exp(1) tensor from the generator), then the Gumbel
    noise of the mix from the same generator; the mix of the filtered guided logits is what the next scale sees and
    what the returned maps hold; the tokenizer decodes those code maps."""
    model, tok = shared(True), msvq()
    labels, cfg, top_k = labels_for(2), 2.5, 8
    with HeadCalls(model) as calls:
        out = model.sample(labels, cfg=cfg, top_k=top_k, top_p=0.9, more_smooth=True,
                           generator=torch.Generator().manual_seed(7))
    assert [m.shape for m in out] == [(2, n, n, tok.spec.dim) for n in model.scales]
    replay = torch.Generator().manual_seed(7)
    codebook = tok.code_vectors().detach()
    for k, (n, raw) in enumerate(zip(model.scales, calls.outputs)):
        t = model.guidance(cfg, k, model.scales, "linear")
        kept = top_p_filter(top_k_filter((1 + t) * raw[:2] - t * raw[2:], top_k), 0.9)
        torch.empty_like(kept).exponential_(generator=replay)  # the token draw VAR makes first
        expected = smooth_codes(kept, codebook, ratio=k / (len(model.scales) - 1), generator=replay)
        torch.testing.assert_close(out[k], expected.view(2, n, n, -1))
    assert tok.decode(out).shape == (2, 1, 16, 16)
    # teacher forcing on the code maps gives the logits the sampler saw (the mixes were fed back)
    with torch.no_grad():
        inputs = tok.teacher_forcing_inputs(out)
        cond = model.logits(inputs, labels, model.scales)
    torch.testing.assert_close(calls.outputs[-1][:2], cond[:, -16:], atol=1e-4, rtol=1e-4)


def test_more_smooth_with_one_kept_code_is_greedy_sampling() -> None:
    model, tok = shared(True), msvq()
    labels = labels_for(3)
    greedy = model.sample(labels, cfg=3.0, top_k=1)
    smooth = model.sample(labels, cfg=3.0, top_k=1, more_smooth=True)
    for ids, codes in zip(greedy, smooth):
        assert torch.equal(codes, tok.code_vectors().detach()[ids])
    torch.testing.assert_close(tok.decode(smooth), tok.decode(greedy))


def test_more_smooth_needs_var_mode_and_a_temperature() -> None:
    with pytest.raises(ValueError, match="more_smooth.*residual=true"):
        shared(False).sample(torch.arange(2), more_smooth=True)
    with pytest.raises(ValueError, match="temperature > 0"):
        shared(True).sample(torch.arange(2), more_smooth=True, temperature=0.0)


@pytest.mark.parametrize("residual", [True, False])
def test_sampling_is_seeded_and_restores_train_mode(residual: bool) -> None:
    model = shared(residual).train()
    labels = torch.tensor([0, 1, 2, 3])
    try:
        draw = lambda seed: model.sample(labels, cfg=1.5, generator=torch.Generator().manual_seed(seed), top_k=16)
        a, b, c = draw(0), draw(0), draw(1)
        flat = lambda x: torch.cat([m.flatten(1) for m in x], 1) if residual else x.flatten(1)
        assert torch.equal(flat(a), flat(b)) and not torch.equal(flat(a), flat(c))
        assert model.training
    finally:
        model.eval()


def test_var_samples_decode_and_flexvar_takes_any_schedule() -> None:
    var = shared(True)
    maps = var.sample(torch.arange(2), cfg=1.0, generator=torch.Generator().manual_seed(0))
    assert msvq().decode(maps).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="residual=false"):
        var.sample(torch.arange(2), schedule=(1, 2, 4))
    flex = shared(False)
    assert flex.scales == (1, 2, 3, 4)
    for schedule in [(1, 4), (1, 2, 4), (1, 2, 3, 4)]:  # fewer, and as many steps as trained
        grid = flex.sample(torch.arange(2), cfg=1.0, generator=torch.Generator().manual_seed(0), schedule=schedule)
        assert grid.shape == (2, 4, 4) and grid.dtype == torch.long
        assert vq().decode(grid).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="end at the token grid side"):
        flex.sample(torch.arange(2), schedule=(1, 2))
    with pytest.raises(ValueError, match="first side"):
        flex.sample(torch.arange(2), schedule=(2, 4))


def test_flexvar_trained_on_a_short_schedule_samples_a_longer_one() -> None:
    """More steps at inference than in training: the position grid resizes, there is no level table."""
    model = make(False, scales=(1, 2, 4), random_schedules=False)
    assert model.training_schedule() == (1, 2, 4)
    grid = model.sample(torch.arange(3), cfg=1.5, generator=torch.Generator().manual_seed(0), schedule=(1, 2, 3, 4))
    assert grid.shape == (3, 4, 4)
    assert not hasattr(model, "lvl_embed") and model.pos_1LC.shape == (1, 32, 8, 8)


# ------------------------------------------------------------------------------------------------ FlexVAR tokens
def test_flexvar_scales_requantise_the_downsampled_quantised_latent() -> None:
    model = make(False, ground_truth="requantised")
    tok = vq()
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = tok.encode(images)
    indices, codes = model.quantized_scales(grid, (1, 2, 4))
    assert torch.equal(indices[-1], grid)  # the last scale is the grid itself
    codebook = tok.quantize.codebook()
    z_q = codebook[grid].permute(0, 3, 1, 2)
    mean = torch.nn.functional.normalize(z_q.mean(dim=(2, 3)), dim=-1)  # the 1×1 scale: area = the mean
    assert torch.equal(indices[0].flatten(), (mean @ codebook.t()).argmax(-1))  # cosine lookup (l2-norm codes)
    torch.testing.assert_close(codes[1], codebook[indices[1]].permute(0, 3, 1, 2))
    inputs, targets = model.teacher_forcing(grid, (1, 2, 4))
    assert inputs.shape == (2, 4 + 16, 4) and targets.shape == (2, 1 + 4 + 16)
    torch.testing.assert_close(inputs[:, :4], codes[0].expand(-1, -1, 2, 2).flatten(2).transpose(1, 2))
    assert torch.equal(model.encode(images), grid)  # requantised: the cache holds the grid
    with pytest.raises(ValueError, match="ground_truth=requantised trains on the token grid"):
        model.loss(shared(False).encode(images), torch.arange(2))


def test_flexvar_ground_truth_quantises_the_continuous_latent_at_each_side() -> None:
    """FlexVAR's trainer: scale n's target is the continuous latent (after quant_conv) area-downsampled to n and
    quantised on its own; the next scale's input is that code map, bicubic-upsampled."""
    model, tok = shared(False), vq()
    assert model.ground_truth == "continuous"
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    per_side = model.encode(images)
    assert [m.shape for m in per_side] == [(2, n, n) for n in range(1, 5)]
    assert torch.equal(per_side[-1], tok.encode(images))  # the grid side is the tokenizer's own tokens
    z = tok.quant_conv(tok.encoder(images))
    codebook = tok.quantize.codebook()
    mean = torch.nn.functional.normalize(z.mean(dim=(2, 3)), dim=-1)  # the 1×1 scale: area = the mean
    assert torch.equal(per_side[0].flatten(), (mean @ codebook.t()).argmax(-1))
    z2 = torch.nn.functional.normalize(z.unflatten(2, (2, 2)).unflatten(4, (2, 2)).mean(dim=(3, 5)), dim=1)
    assert torch.equal(per_side[1], torch.einsum("bchw,vc->bhwv", z2, codebook).argmax(-1))
    # (2×2 here differs from re-quantising the quantised latent for some image: the two rules are not the same)
    requantised = make(False, ground_truth="requantised").quantized_scales(per_side[-1], (1, 2, 3, 4))[0]
    assert any(not torch.equal(a, b) for a, b in zip(requantised, per_side))
    inputs, targets = model.teacher_forcing(per_side, (1, 2, 4))
    assert torch.equal(targets, torch.cat([per_side[0].flatten(1), per_side[1].flatten(1), per_side[3].flatten(1)], 1))
    torch.testing.assert_close(inputs[:, 4:], model.flex_input(codebook[per_side[1]].permute(0, 3, 1, 2), 4))
    with pytest.raises(ValueError, match="ground_truth=continuous .* got a single token grid"):
        model.loss(per_side[-1], torch.arange(2))
    with pytest.raises(ValueError, match="per-side tokens must be 4 maps"):
        model.loss(per_side[1:], torch.arange(2))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), default=st.sampled_from([var_schedule(8), var_schedule(16), (1, 2, 4, 8)]),
       trim_last=st.booleans())
def test_flexvar_random_schedules(seed: int, default: tuple[int, ...], trim_last: bool) -> None:
    schedule = flexvar_schedule(default, trim_last=trim_last, generator=torch.Generator().manual_seed(seed))
    assert schedule[:2] == default[:2] and schedule[-1] <= default[-1]
    if not trim_last:
        assert schedule[-1] == default[-1]
    assert all(b > a for a, b in zip(schedule, schedule[1:]))
    assert sum(n * n for n in schedule) <= sum(n * n for n in default)
    assert 3 <= len(schedule) <= len(default)


def test_flexvar_schedule_rule_at_side_16() -> None:
    """FlexVAR's rule: mostly 1, 2, five sides in 3..10, two in 11..15, 16 (before drops and the token budget);
    trimming to 680 tokens drops one of the last four sides, the last one too: FlexVAR's gen_curr_patch_nums ends
    below 16 in 33.1% of 20,000 draws (experiments/parity/flexvar.py), arvision's in about as many."""
    gen = torch.Generator().manual_seed(0)
    draws = [flexvar_schedule(var_schedule(16), full_prob=0.0, generator=gen) for _ in range(2000)]
    assert len(set(draws)) > 500
    for s in draws:
        assert sum(n * n for n in s) <= 680 and s[:2] == (1, 2)
        assert sum(n >= 11 for n in s if n < 16) <= 2
    below = sum(s[-1] < 16 for s in draws) / len(draws)
    assert 0.3 < below < 0.38
    gen = torch.Generator().manual_seed(0)
    kept = [flexvar_schedule(var_schedule(16), trim_last=False, generator=gen) for _ in range(500)]
    assert all(s[-1] == 16 for s in kept)
    full = {flexvar_schedule(var_schedule(16), full_prob=1.0, generator=gen) for _ in range(200)}
    assert var_schedule(16) in full  # the default schedule, with FlexVAR's scale dropping applied to it as well
    assert all(set(s) < set(var_schedule(16)) and s[:2] == (1, 2) and s[-1] == 16 for s in full - {var_schedule(16)})


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("residual", [True, False])
def test_loss_reports_per_scale_and_decreases_when_overfitting(residual: bool) -> None:
    torch.manual_seed(0)
    tok = msvq() if residual else vq()
    model = NextScaleGenerator(spec=tok.spec, num_classes=NUM_CLASSES, depth=2, dim=32, heads=2, residual=residual,
                               random_schedules=False).attach_tokenizer(tok).train()  # FlexVAR: per-side tokens
    tokens, labels = tokens_for(model, b=4), labels_for(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model.loss(tokens, labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    k = len(model.scales)
    assert set(out) >= {"loss", "accuracy", "loss_last", "acc_last", *(f"loss_s{i}" for i in range(k)),
                        *(f"acc_s{i}" for i in range(k))}
    # the head starts at ×0.02 of VAR's std: nearly uniform over the vocabulary
    assert losses[0] == pytest.approx(math.log(32), abs=0.02)
    assert losses[-1] < 0.5 * losses[0]
    lengths = torch.tensor([n * n for n in model.scales], dtype=torch.float)
    per_scale = torch.stack([out[f"loss_s{i}"] for i in range(k)])
    # the loss is the token mean: per-scale losses weighted by their token counts
    model.eval()
    with torch.no_grad():
        out = model.loss(tokens, labels)
    per_scale = torch.stack([out[f"loss_s{i}"] for i in range(k)])
    torch.testing.assert_close(out["loss"], (per_scale * lengths).sum() / lengths.sum())
    torch.testing.assert_close(out["loss_last"], out[f"loss_s{k - 1}"])


def test_random_schedules_in_training_only() -> None:
    model = make(False)
    model.train()
    torch.manual_seed(0)
    seen = {model.training_schedule() for _ in range(200)}
    assert seen == {(1, 2, 3, 4), (1, 2, 4)}  # side 4: the default, and a dropped middle scale
    tokens, labels = tokens_for(model), labels_for()
    out = model.loss(tokens, labels)  # whatever schedule was drawn
    assert torch.isfinite(out["loss"]) and "loss_last" in out
    out["loss"].backward()
    model.eval()
    assert {model.training_schedule() for _ in range(20)} == {model.scales}


def test_label_dropout_only_in_training() -> None:
    model = make(True, cond_drop_rate=0.25)
    labels = torch.randint(0, NUM_CLASSES, (20000,), generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(0)
    cond = model.condition(labels)
    null = (cond == model.class_emb.weight[NUM_CLASSES]).all(-1)
    assert abs(null.float().mean().item() - 0.25) < 0.015
    model.eval()
    torch.testing.assert_close(model.condition(labels), model.class_emb(labels))
    assert model.class_emb.num_embeddings == NUM_CLASSES + 1


def test_var_size_rule_and_init() -> None:
    tok = msvq()
    model = NextScaleGenerator(spec=tok.spec, num_classes=NUM_CLASSES, depth=3)
    assert model.dim == 192 and model.blocks[0].attn.heads == 3 and model.blocks[0].attn.head_dim == 64
    assert model.blocks[-1].drop_path.p == pytest.approx(0.1 * 3 / 24) and model.blocks[0].drop_path.p == 0
    std = math.sqrt(1 / 192 / 3)
    lin = model.blocks[0].ada_lin[-1].weight
    assert lin[:2 * 192].std().item() == pytest.approx(std * 1e-5, rel=0.1)  # γ rows: near-zero branches
    assert lin[2 * 192:].std().item() == pytest.approx(std * 0.5, rel=0.1)
    assert model.head.weight.std().item() == pytest.approx(std * 0.02, rel=0.15)
    assert model.class_emb.weight.std().item() == pytest.approx(std, rel=0.15)
    attn = model.blocks[0].attn
    torch.testing.assert_close(attn.scale_mul_1H11.exp(), torch.full((1, 3, 1, 1), 4.0))
    assert torch.equal(model.state_dict()["blocks.0.attn.zero_k_bias"], torch.zeros(192))  # VAR's fixed k bias
    keys = set(model.state_dict())
    for key in ("class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight", "word_embed.weight",
                "blocks.0.attn.mat_qkv.weight", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias",
                "blocks.0.ffn.fc1.weight", "blocks.0.ada_lin.1.weight", "head_nm.ada_lin.1.weight", "head.weight"):
        assert key in keys, key
    shared_aln = NextScaleGenerator(spec=tok.spec, num_classes=NUM_CLASSES, depth=2, shared_aln=True)
    assert "shared_ada_lin.1.weight" in shared_aln.state_dict() and "blocks.0.ada_gss" in shared_aln.state_dict()
    tokens = [torch.zeros(2, n, n, dtype=torch.long) for n in tok.spec.scales]
    assert shared_aln.attach_tokenizer(tok)(tokens, torch.arange(2)).shape == (2, 30, 32)


def test_attention_without_l2_norm_uses_vars_softmax_scale() -> None:
    model = make(True, attn_l2_norm=False)
    attn = model.blocks[0].attn
    assert attn.scale == pytest.approx(0.25 / math.sqrt(16)) and not hasattr(attn, "scale_mul_1H11")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        q, k, v = (x @ attn.mat_qkv.weight.t() + torch.cat([attn.q_bias, attn.zero_k_bias, attn.v_bias])).chunk(3, -1)
        split = lambda t: t.view(2, 5, 2, 16).transpose(1, 2)
        weights = (split(q) @ split(k).transpose(-1, -2) * attn.scale).softmax(-1)
        expected = attn.proj((weights @ split(v)).transpose(1, 2).reshape(2, 5, 32))
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ compatibility
def test_incompatible_tokenizers() -> None:
    vae = TokenSpec(name="vae", kind="continuous", layout="grid", grid=(4, 4), dim=4)
    with pytest.raises(IncompatibleTokenizer) as err:
        NextScaleGenerator(spec=vae, num_classes=NUM_CLASSES, depth=1)
    assert str(err.value) == ("next_scale needs a multi-scale tokenizer (tokenizer=msvq) or residual=false with "
                              "tokenizer=vq; got tokenizer=vae")
    with pytest.raises(IncompatibleTokenizer, match="got tokenizer=vq$"):
        NextScaleGenerator(spec=vq().spec, num_classes=NUM_CLASSES, depth=1)
    with pytest.raises(IncompatibleTokenizer, match="residual=false.*got tokenizer=msvq$"):
        NextScaleGenerator(spec=msvq().spec, num_classes=NUM_CLASSES, depth=1, residual=False)
    rvq = TokenSpec(name="rvq", kind="discrete", layout="depth", grid=(4, 4), dim=4, vocab_size=16, depth=2)
    for residual in (True, False):
        with pytest.raises(IncompatibleTokenizer, match="got tokenizer=rvq$"):
            NextScaleGenerator(spec=rvq, num_classes=NUM_CLASSES, depth=1, residual=residual)
    with pytest.raises(ValueError, match="attention"):
        NextScaleGenerator(spec=msvq().spec, num_classes=NUM_CLASSES, depth=1, attention="xformers")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("overrides", [["tokenizer=msvq"], ["tokenizer=vq", "generator.residual=false"]])
def test_tiny_run_end_to_end(tiny_cfg, tmp_path, overrides) -> None:
    from arvision.pipeline import run as train

    cfg = tiny_cfg("generator=next_scale", *overrides)
    results = train(cfg, tmp_path / "run")
    gen = results["metrics"]["generator"]
    assert gen["nfe_per_image"] == len(var_schedule(8))
    assert gen["test_loss"]["value"] < untrained_test_loss(cfg, results) - 0.03  # training lowered the held-out loss
    assert (tmp_path / "run" / "samples.png").exists()


def test_no_weight_decay_names_vars_exclusions() -> None:
    names = make(True).no_weight_decay()
    assert {"pos_start", "pos_1LC", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11"} <= names
    assert not any(n.startswith(("class_emb", "word_embed", "head")) or "mat_qkv" in n for n in names)
    assert make(False).no_weight_decay() >= {"pos_start", "pos_1LC"}


def test_flexvar_token_cache_is_keyed_by_its_ground_truth(tiny_cfg, tmp_path) -> None:
    """ground_truth=continuous caches one map per side under its own key; requantised caches the grid."""
    from arvision import pipeline
    from arvision.utils.artifacts import ArtifactCache

    caches = {}
    for truth in ("continuous", "requantised"):
        cfg = tiny_cfg("tokenizer=vq", "generator=next_scale", "generator.residual=false",
                       f"generator.model.ground_truth={truth}", "data.shapes_train_size=40")
        dm = pipeline.build_datamodule(cfg)
        torch.manual_seed(0)  # the same (untrained) tokenizer both times
        tokenizer = pipeline.build_tokenizer(cfg, dm).eval()
        cache = ArtifactCache(tmp_path / "artifacts")
        tokens, labels = pipeline.get_token_cache(cfg, tokenizer, tmp_path / "tok", dm, cache).load()
        caches[truth] = (tokens, [d for d in (tmp_path / "artifacts" / "token_store").iterdir() if d.is_dir()])
        assert labels.shape == (40,)
    side = tokenizer.spec.grid[0]
    per_side, grid = caches["continuous"][0], caches["requantised"][0]
    assert [tuple(t.shape) for t in per_side] == [(40, n, n) for n in range(1, side + 1)]
    assert tuple(grid.shape) == (40, side, side) and torch.equal(per_side[-1], grid)
    assert len(caches["requantised"][1]) == len(caches["continuous"][1]) + 1  # a second cache, not an overwrite
