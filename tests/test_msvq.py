"""VAR's multi-scale residual VQ: encode/decode paths, teacher forcing, φ sharing, single-scale = plain VQ."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.tokenizers.msvq import (VAR_SCALES, MultiScaleQuantizer, MultiScaleVQTokenizer, default_scales,
                                      phi_index)
from arvision.tokenizers.quantize import (VectorQuantizer, balanced_rows, nearest_code, restart_dead_codes,
                                         usage_and_perplexity)


def tiny_tokenizer(**kw) -> MultiScaleVQTokenizer:
    args = dict(image_size=16, image_channels=1, ch=8, ch_mult=(1, 2), z_channels=8, vocab_size=32, code_dim=4,
                mid_attn=False)
    args.update(kw)
    return MultiScaleVQTokenizer(**args)


def images(b: int = 2, c: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def quantizer(scales, dim: int = 3, vocab: int = 16, seed: int = 0, **kw) -> MultiScaleQuantizer:
    torch.manual_seed(seed)
    q = MultiScaleQuantizer(vocab_size=vocab, dim=dim, scales=scales, **kw)
    q.embedding.weight.data.normal_()  # codes of the features' scale, so every scale picks varied codes
    return q


schedules = st.integers(1, 8).flatmap(
    lambda side: st.sets(st.integers(1, side - 1), max_size=4).map(lambda s: tuple(sorted(s)) + (side,))
    if side > 1 else st.just((1,)))


# ------------------------------------------------------------------------------------------------ schedule
def test_default_schedule_is_vars_truncated_to_the_latent_side():
    assert default_scales(16) == VAR_SCALES
    assert default_scales(8) == (1, 2, 3, 4, 5, 6, 8)
    assert default_scales(7) == (1, 2, 3, 4, 5, 6, 7)
    assert default_scales(1) == (1,)
    assert tiny_tokenizer().spec.scales == (1, 2, 3, 4, 5, 6, 8)  # 16 px, one downsampling → 8×8 latent


@given(st.integers(1, 40))
def test_default_schedule_is_increasing_and_ends_at_the_side(side):
    scales = default_scales(side)
    assert scales[-1] == side and all(b > a for a, b in zip(scales, scales[1:]))
    assert set(scales[:-1]) <= set(VAR_SCALES)


@pytest.mark.parametrize("scales,match", [((1, 2, 4), "end at the latent side 8"), ((1, 4, 2, 8), "increasing"),
                                          ((1, 2, 2, 8), "increasing"), ((0, 8), "positive"), ((), "empty"),
                                          ((1, 2, 16), "end at the latent side 8")])
def test_bad_schedules_are_rejected_with_a_clear_error(scales, match):
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer(scales=scales)


def test_spec_describes_the_scales_layout():
    tok = tiny_tokenizer(scales=[1, 2, 4, 8])  # a YAML list is accepted
    spec = tok.spec
    assert (spec.name, spec.kind, spec.layout, spec.grid, spec.dim) == ("msvq", "discrete", "scales", (8, 8), 4)
    assert spec.scales == (1, 2, 4, 8) and spec.vocab_size == 32 and spec.num_tokens == 1 + 4 + 16 + 64
    assert (spec.image_size, spec.image_channels) == (16, 1)


# ------------------------------------------------------------------------------------------------ φ sharing
def var_tick_rule(k: int, num_scales: int, count: int) -> int:
    # FoundationVision/VAR models/quant.py, PhiPartiallyShared: numpy float64 ticks, argmin of the distance.
    ticks = (np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count) if count == 4
             else np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count))
    return int(np.argmin(np.abs(ticks - k / (num_scales - 1))))


def test_phi_sharing_matches_vars_table_including_its_float64_ties():
    # The table VAR's released VAE uses (scales 3 and 8 are exact ties in real arithmetic).
    assert [phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert tiny_tokenizer(scales=(1, 2, 3, 4, 5, 6, 7, 8)).quantize.phi_of_scale == tuple(
        var_tick_rule(k, 8, 4) for k in range(8))


@pytest.mark.parametrize("num_scales,count", [(10, 4), (7, 4), (10, 3), (7, 2), (14, 4), (5, 5), (3, 4)])
def test_phi_sharing_follows_vars_tick_rule(num_scales, count):
    assert [phi_index(k, num_scales, count) for k in range(num_scales)] == [
        var_tick_rule(k, num_scales, count) for k in range(num_scales)]


@given(st.integers(2, 16))
def test_one_phi_per_scale_and_a_single_shared_phi(num_scales):
    assert [phi_index(k, num_scales, num_scales) for k in range(num_scales)] == list(range(num_scales))
    assert {phi_index(k, num_scales, 1) for k in range(num_scales)} == {0}


def test_phi_count_builds_that_many_convs_and_zero_ratio_is_the_identity():
    assert len(tiny_tokenizer().quantize.quant_resi) == 4
    assert len(tiny_tokenizer(phi_count=0).quantize.quant_resi) == 7  # VAR's share_quant_resi=0: one per scale
    q = quantizer((1, 2), phi_ratio=0.0)
    assert all(isinstance(m, torch.nn.Identity) for m in q.quant_resi)
    h = torch.randn(2, 3, 2, 2)
    phi = tiny_tokenizer(code_dim=3).quantize.quant_resi[0]
    assert torch.allclose(phi(h), 0.5 * h + 0.5 * F.conv2d(h, phi.weight, phi.bias, padding=1), atol=1e-6)


# ------------------------------------------------------------------------------------------------ encode / decode
def test_decode_of_own_indices_equals_the_forward_reconstruction_and_fhat():
    tok = tiny_tokenizer().eval()
    x = images()
    out = tok(x)
    f = tok.quant_conv(tok.encoder(x))
    f_hat, indices, _ = tok.quantize(f)
    tokens = tok.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(tokens, out["indices"]))
    assert torch.allclose(tok.indices_to_fhat(tokens), f_hat, atol=1e-5)
    assert torch.allclose(tok.decode(tokens), out["recon"].clamp(-1, 1), atol=1e-5)
    assert torch.allclose(tok.fhat_to_image(tok.indices_to_fhat(tokens)), tok.decode(tokens))


def test_each_scale_quantises_the_area_downsampled_residual_of_the_previous_scales():
    q = quantizer((1, 2, 3, 5))
    f = torch.randn(2, 3, 5, 5)
    _, indices, _ = q(f)
    for k, n in enumerate(q.scales):
        before = q.indices_to_fhat(indices[:k]) if k else torch.zeros_like(f)
        z = F.adaptive_avg_pool2d(f - before, n)  # area downsampling = adaptive average pooling
        expected = nearest_code(rearrange(z, "b c h w -> (b h w) c"), q.embedding.weight).view(2, n, n)
        assert torch.equal(indices[k], expected), k


def test_finer_scales_reduce_the_residual():
    q = quantizer((1, 2, 4, 8), vocab=64)
    f = F.interpolate(torch.randn(4, 3, 2, 2), size=(8, 8), mode="bilinear")  # smooth: coarse scales can help
    _, indices, _ = q(f)
    errors = [F.mse_loss(q.indices_to_fhat(indices[:k + 1]), f).item() for k in range(4)]
    assert errors[-1] < errors[0] < F.mse_loss(torch.zeros_like(f), f).item()


@pytest.mark.parametrize("channels,size,mult", [(1, 16, (1, 2)), (3, 16, (1, 2, 2)), (3, 32, (1, 2, 2))])
def test_round_trip_shapes_and_ranges(channels, size, mult):
    tok = tiny_tokenizer(image_channels=channels, image_size=size, ch_mult=mult).eval()
    tokens = tok.encode(images(3, channels, size))
    assert [t.shape for t in tokens] == [(3, n, n) for n in tok.spec.scales]
    assert all(t.dtype == torch.long and t.min() >= 0 and t.max() < 32 for t in tokens)
    recon = tok.decode(tokens)
    assert recon.shape == (3, channels, size, size) and recon.min() >= -1 and recon.max() <= 1
    with pytest.raises(ValueError, match="all"):
        tok.decode(tokens[:-1])


# ------------------------------------------------------------------------------------------------ single scale
def test_a_single_scale_is_plain_vq_on_the_same_codebook():
    q = quantizer((4,), phi_ratio=0.0)
    vq = VectorQuantizer(vocab_size=16, dim=3, l2_norm=False)
    vq.embedding.weight.data.copy_(q.embedding.weight.data)
    f = torch.randn(2, 3, 4, 4)
    f_hat, (idx,), terms = q(f)
    z_q, vq_idx, vq_terms = vq(f)
    assert torch.equal(idx, vq_idx)
    # With φ the identity, codes, losses and stats are VQ's too.
    assert torch.allclose(f_hat, z_q, atol=1e-6)
    for key in ("codebook_loss", "commit_loss", "usage", "perplexity"):
        assert torch.allclose(terms[key], vq_terms[key]), key


def test_a_single_scale_with_phi_keeps_vqs_indices_but_phi_still_shapes_the_code():
    # φ acts after the lookup (VAR applies it at the last scale too): the choice is VQ's, the summed code is not.
    q = quantizer((4,))
    vq = VectorQuantizer(vocab_size=16, dim=3, l2_norm=False)
    vq.embedding.weight.data.copy_(q.embedding.weight.data)
    f = torch.randn(2, 3, 4, 4)
    f_hat, (idx,), _ = q(f)
    z_q, vq_idx, _ = vq(f)
    assert torch.equal(idx, vq_idx)
    assert torch.allclose(f_hat, q.quant_resi[0](z_q), atol=1e-6) and not torch.allclose(f_hat, z_q, atol=1e-3)


def test_single_scale_tokenizer_matches_vector_quantizer_on_its_features():
    tok = tiny_tokenizer(scales=(8,)).eval()
    vq = VectorQuantizer(vocab_size=32, dim=4, l2_norm=False)
    vq.embedding.weight.data.copy_(tok.quantize.embedding.weight.data)
    x = images()
    (idx,) = tok.encode(x)
    assert torch.equal(idx, vq(tok.quant_conv(tok.encoder(x)))[1])
    assert tok.teacher_forcing_inputs([idx]).shape == (2, 0, 4)


def test_l2_norm_chooses_by_cosine_but_sums_raw_codes():
    q = quantizer((2,), l2_norm=True, phi_ratio=0.0)
    f = torch.randn(2, 3, 2, 2)
    f_hat, (idx,), _ = q(f)
    cos = F.normalize(rearrange(f, "b c h w -> (b h w) c"), dim=-1) @ F.normalize(q.embedding.weight, dim=-1).t()
    assert torch.equal(idx.flatten(), cos.argmax(1))
    assert torch.allclose(f_hat, rearrange(q.embedding.weight[idx], "b h w c -> b c h w"), atol=1e-6)


# ------------------------------------------------------------------------------------------------ generator side
@given(schedules, st.integers(1, 3), st.integers(0, 10_000))
@settings(max_examples=20, deadline=None)
def test_teacher_forcing_inputs_are_the_accumulators_successive_inputs(scales, b, seed):
    q = quantizer(scales, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, 16, (b, n, n), generator=g) for n in scales]
    tf = q.teacher_forcing_inputs(tokens)
    assert tf.shape == (b, sum(n * n for n in scales[1:]), 3) and tf.dtype == torch.float32
    # 1. the step-by-step sampler sees exactly these inputs, in this order (flat indices accepted too)
    f_hat, steps = None, []
    for k, idx in enumerate(tokens):
        f_hat, nxt = q.next_scale_input(k, f_hat, idx.flatten(1))
        if k < len(scales) - 1:
            assert nxt.shape == (b, scales[k + 1] ** 2, 3)
            steps.append(nxt)
        else:
            assert nxt is None
    assert torch.allclose(tf, torch.cat(steps, 1) if steps else torch.zeros(b, 0, 3), atol=1e-6)
    assert torch.allclose(f_hat, q.indices_to_fhat(tokens), atol=1e-6)
    # 2. segment k is the running f̂ after scales < k, area-downsampled to n_k and flattened row-major
    start = 0
    for k, n in enumerate(scales[1:], start=1):
        partial = q.indices_to_fhat(tokens[:k])
        expected = rearrange(F.adaptive_avg_pool2d(partial, n), "b c h w -> b (h w) c")
        assert torch.allclose(tf[:, start:start + n * n], expected, atol=1e-5)
        start += n * n
    # 3. the last scale's indices are not needed
    if len(scales) > 1:
        assert torch.equal(q.teacher_forcing_inputs(tokens[:-1]), tf)


def test_teacher_forcing_of_the_tokenizer_matches_vars_sum_of_upsampled_codes():
    tok = tiny_tokenizer().eval()
    tokens = tok.encode(images())
    tf = tok.teacher_forcing_inputs(tokens)
    scales = tok.spec.scales
    assert tf.shape == (2, sum(n * n for n in scales[1:]), 4) == (2, tok.spec.num_tokens - 1, 4)
    # Scale 2's input: scale 1's single code, bicubic-upsampled (a constant map), through φ_0, pooled to 2×2.
    q = tok.quantize
    h0 = q.quant_resi[q.phi_of_scale[0]](F.interpolate(
        rearrange(q.embedding(tokens[0]), "b h w c -> b c h w"), size=(8, 8), mode="bicubic"))
    assert torch.allclose(tf[:, :4], rearrange(F.adaptive_avg_pool2d(h0, 2), "b c h w -> b (h w) c"), atol=1e-5)


def test_too_many_token_maps_are_rejected():
    q = quantizer((1, 2))
    with pytest.raises(ValueError, match="schedule"):
        q.indices_to_fhat([torch.zeros(1, n, n, dtype=torch.long) for n in (1, 2, 2)])


# ------------------------------------------------------------------------------------------------ losses, stats
def test_losses_are_vars_mean_over_scales_on_the_cumulative_fhat():
    q = quantizer((1, 2, 4), beta=0.25)
    f = torch.randn(2, 3, 4, 4)
    _, indices, terms = q(f)
    partials = [q.indices_to_fhat(indices[:k + 1]) for k in range(3)]
    mse = torch.stack([F.mse_loss(p, f) for p in partials]).mean()
    assert torch.allclose(terms["codebook_loss"], mse, atol=1e-6)
    assert torch.allclose(terms["commit_loss"], 0.25 * mse, atol=1e-6)


def test_per_scale_usage_and_perplexity():
    q = quantizer((1, 2, 4))
    f = torch.randn(3, 3, 4, 4)
    _, indices, terms = q(f)
    for k, idx in enumerate(indices):
        usage, perplexity = usage_and_perplexity(idx, 16)
        assert torch.equal(terms[f"usage_s{k}"], usage) and torch.equal(terms[f"perplexity_s{k}"], perplexity)
    assert math.isclose(terms["usage"].item(), np.mean([terms[f"usage_s{k}"].item() for k in range(3)]), rel_tol=1e-6)
    assert math.isclose(terms["perplexity"].item(),
                        np.mean([terms[f"perplexity_s{k}"].item() for k in range(3)]), rel_tol=1e-6)
    # A zero feature picks the zero code at every scale: one code used, perplexity 1.
    q.embedding.weight.data[5] = 0.0
    _, indices, terms = q(torch.zeros(2, 3, 4, 4))
    assert all(torch.equal(idx, torch.full_like(idx, 5)) for idx in indices)
    assert all(math.isclose(terms[f"usage_s{k}"].item(), 1 / 16) and terms[f"perplexity_s{k}"].item() == 1.0
               for k in range(3))


def test_straight_through_gradients_reach_the_encoder_and_the_codebook_gets_its_own():
    tok = tiny_tokenizer()
    out = tok(images())
    assert set(out) >= {"recon", "indices", "loss", "recon_loss", "codebook_loss", "commit_loss", "usage",
                        "perplexity", "usage_s0", "perplexity_s6"}
    codebook, phi, enc = tok.quantize.embedding.weight, tok.quantize.quant_resi[0].weight, tok.encoder.conv_in.weight

    def grads(loss):
        tok.zero_grad()
        loss.backward(retain_graph=True)
        return [p.grad is not None and p.grad.abs().sum() > 0 for p in (codebook, phi, enc)]

    assert grads(out["recon_loss"]) == [False, False, True]  # straight-through skips codebook and φ
    assert grads(out["codebook_loss"]) == [True, True, False]
    assert grads(out["commit_loss"]) == [False, False, True]
    assert torch.allclose(out["loss"], out["recon_loss"] + out["codebook_loss"] + out["commit_loss"])


def test_state_dict_keys_and_vars_3x3_quant_convs():
    tok = tiny_tokenizer()
    keys = set(tok.state_dict())
    assert {"quantize.embedding.weight", "quantize.quant_resi.3.weight", "quantize.quant_resi.3.bias"} <= keys
    assert tok.quant_conv.weight.shape == (4, 8, 3, 3) and tok.post_quant_conv.weight.shape == (8, 4, 3, 3)


def test_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    tok = tiny_tokenizer(scales=(1, 2, 4, 8))
    x = images(8, seed=1)
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    first = tok(x)["recon_loss"].item()
    for _ in range(15):
        out = tok(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["recon_loss"].item() < 0.7 * first


def test_restart_unused_reseeds_the_shared_codebook_from_what_the_scales_quantised():
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(vocab_size=64, dim=4, scales=(1, 2, 4), restart_unused=True).train()
    with torch.no_grad():
        quantizer.embedding.weight[:] = 100.0  # all codes far away but code 0 (zero: residuals stay f), so 63 die
        quantizer.embedding.weight[0] = 0.0
    f = torch.randn(3, 4, 4, 4)
    _, indices, _ = quantizer(f)
    used = torch.cat([i.flatten() for i in indices]).unique()
    dead = torch.ones(64, dtype=torch.bool)
    dead[used] = False
    assert dead.sum() == 63
    moved = quantizer.embedding.weight[dead]
    # every dead code now sits on one of the residuals the scales quantised (up to the jitter of tiled copies: 63
    # vectors for 64 codes); the live zero code kept the partial sums those residuals were taken from
    with torch.no_grad():
        residuals = torch.cat([rearrange(F.adaptive_avg_pool2d(f - quantizer.indices_to_fhat(indices[:k]) if k else f,
                                                               n), "b c h w -> (b h w) c")
                               for k, n in enumerate(quantizer.scales)])
    assert residuals.shape == (63, 4)
    assert torch.cdist(moved, residuals).min(dim=1).values.max() < 0.05


def test_restart_patience_spares_a_code_until_it_has_idled_that_many_batches():
    """patience P: a code nobody chose is re-seeded in its P-th idle batch in a row, and choosing it resets the
    count. Codebook {0, 100, 200}, inputs near 0: codes 1 and 2 idle; code 2 is then chosen once in batch 2."""
    weight = torch.tensor([[0.0], [100.0], [200.0]])
    idle = torch.zeros(3, dtype=torch.long)
    near_zero = torch.full((5, 1), 0.1)
    dead = restart_dead_codes(weight, near_zero, torch.zeros(5, dtype=torch.long), idle, patience=3)
    assert not dead.any() and idle.tolist() == [0, 1, 1]
    dead = restart_dead_codes(weight, near_zero, torch.tensor([0, 0, 2]), idle, patience=3)
    assert not dead.any() and idle.tolist() == [0, 2, 0]  # code 2 was chosen: its count starts again
    dead = restart_dead_codes(weight, near_zero, torch.zeros(5, dtype=torch.long), idle, patience=3)
    assert dead.tolist() == [False, True, False]  # code 1's third idle batch
    assert weight[1].item() == pytest.approx(0.1) and weight[2].item() == 200.0
    assert idle.tolist() == [0, 0, 1]  # the re-seeded code gets a fresh patience
    # patience 1 is the per-batch rule: the same as no counter at all
    w1, w2 = weight.clone(), weight.clone()
    restart_dead_codes(w1, near_zero, torch.zeros(5, dtype=torch.long))
    restart_dead_codes(w2, near_zero, torch.zeros(5, dtype=torch.long), torch.zeros(3, dtype=torch.long), 1)
    torch.testing.assert_close(w1, w2)


def test_balanced_restart_candidates_come_evenly_from_every_scale():
    torch.manual_seed(0)
    coarse, fine = torch.zeros(2, 3), torch.ones(500, 3)  # 2 vectors of one scale, 500 of another
    pool = balanced_rows([coarse, fine], 64)
    assert pool.shape == (128, 3)
    assert (pool.sum(1) < 0.5).sum() == 64  # half the pool is the 2 coarse vectors (tiled), not 2/502 of it


def test_patient_balanced_restarts_keep_codes_only_the_coarsest_scale_chooses():
    """With per-batch restarts a code that only the 1×1 scale picks dies whenever a batch misses it; with patience
    it survives, and the counters are part of the state (a resumed run keeps them)."""
    torch.manual_seed(0)

    def patient() -> MultiScaleQuantizer:
        return MultiScaleQuantizer(vocab_size=16, dim=2, scales=(1, 2), restart_unused=True, restart_patience=4,
                                   restart_balanced=True).train()

    q = patient()
    assert "idle_steps" in q.state_dict()
    with torch.no_grad():
        q.embedding.weight[:] = torch.randn(16, 2)
    before = q.embedding.weight.clone()
    start = {k: v.clone() for k, v in q.state_dict().items() if k != "idle_steps"}
    x = torch.randn(2, 2, 2, 2)
    _, indices, _ = q(x)  # one batch: 2 + 8 choices leave most of the 16 codes idle, but none for 4 batches
    torch.testing.assert_close(q.embedding.weight, before)
    assert int(q.idle_steps.max()) == 1
    chosen = torch.zeros(16, dtype=torch.bool)
    chosen[torch.cat([i.flatten() for i in indices])] = True
    assert not chosen.all()

    # per-batch restarts (patience 1) re-seed the idle codes after this very batch
    plain = MultiScaleQuantizer(vocab_size=16, dim=2, scales=(1, 2), restart_unused=True,
                                restart_balanced=True).train()
    assert "idle_steps" not in plain.state_dict()
    plain.load_state_dict(start)
    plain(x)
    assert torch.equal((plain.embedding.weight != before).any(1), ~chosen)

    # a resumed quantizer carries the counters on: both re-seed the same codes in the fourth idle batch
    resumed = patient()
    resumed.load_state_dict(q.state_dict())
    assert torch.equal(resumed.idle_steps, q.idle_steps)
    for _ in range(2):
        q(x), resumed(x)
    torch.testing.assert_close(q.embedding.weight, before)
    for model in (q, resumed):
        torch.manual_seed(1)
        model(x)
    changed = (q.embedding.weight != before).any(1)
    assert torch.equal(changed, ~chosen)
    assert torch.equal(resumed.embedding.weight, q.embedding.weight)
    with pytest.raises(ValueError, match="restart_patience"):
        MultiScaleQuantizer(vocab_size=16, dim=2, scales=(1, 2), restart_unused=True, restart_patience=0)
