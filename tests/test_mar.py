"""MARGenerator: training masks and orders, the bidirectional and causal networks (and the causal KV cache), MAR's
diffusion head and its process, the masked sampler's schedule and cost, the Table-1 switches, runs end to end."""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from arvision.generators.base import IncompatibleTokenizer
from arvision.generators.mar import (MARGenerator, mask_schedule, masked_by_order, revealed_per_step,
                                     truncated_mask_ratio)
from arvision.nn.heads import CrossEntropyHead, DiffusionHead
from arvision.nn.processes import LearnedVarianceDiffusion, betas_for, space_timesteps
from arvision.tokenizers.base import TokenSpec
from tests.conftest import cli_env, run_crashing_at, untrained_test_loss

VAE = TokenSpec(name="vae", kind="continuous", layout="grid", grid=(4, 4), dim=4, image_size=16)
VQ = TokenSpec(name="vq", kind="discrete", layout="grid", grid=(4, 4), dim=8, vocab_size=32, image_size=16)
N = 16
NUM_CLASSES = 10


def make(spec: TokenSpec = VAE, *, seed: int = 0, **kwargs) -> MARGenerator:
    torch.manual_seed(seed)
    kwargs = {"dim": 32, "depth": 2, "heads": 2, "buffer_size": 3, "head_width": 32, "head_depth": 2,
              "attn_dropout": 0.0, "proj_dropout": 0.0, **kwargs}
    model = MARGenerator(spec=spec, num_classes=NUM_CLASSES, **kwargs)
    if isinstance(model.diffloss, DiffusionHead):  # the zero-initialised output would hide the head
        torch.nn.init.normal_(model.diffloss.net.final_layer.linear.weight, std=0.3)
    return model.eval()


@functools.cache
def shared(attention: str = "bidirectional", order: str = "random", spec: TokenSpec = VAE) -> MARGenerator:
    return make(spec, attention=attention, order=order)


def tokens(b: int = 3, spec: TokenSpec = VAE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (b,), generator=gen)
    if spec.kind == "continuous":
        return torch.randn(b, spec.dim, *spec.grid, generator=gen), labels
    return torch.randint(0, spec.vocab_size, (b, *spec.grid), generator=gen), labels


# --- training masks, orders and the sampling schedule ---------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.floats(0.0, 0.999999), st.sampled_from([0.5, 0.7, 0.9]))
def test_mask_ratio_is_marss_truncated_normal(u: float, low: float) -> None:
    r = truncated_mask_ratio(torch.tensor(u, dtype=torch.float64), min_ratio=low).item()
    assert low <= r <= 1.0
    expected = stats.truncnorm((low - 1.0) / 0.25, 0, loc=1.0, scale=0.25).ppf(u)  # MAR's generator, inverted
    assert r == pytest.approx(expected, abs=1e-9)


def test_mask_ratio_distribution_has_marss_mean_and_bounds() -> None:
    r = truncated_mask_ratio(torch.rand(200_000, generator=torch.Generator().manual_seed(0)), min_ratio=0.7)
    assert r.min() >= 0.7 and r.max() <= 1.0
    assert r.mean().item() == pytest.approx(stats.truncnorm(-1.2, 0, loc=1.0, scale=0.25).mean(), abs=2e-3)  # ≈ 0.87


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.data())
def test_masks_are_the_last_tokens_of_each_order(b: int, n: int, data) -> None:
    k = data.draw(st.integers(0, n))
    order = torch.rand(b, n, generator=torch.Generator().manual_seed(n)).argsort(1)
    mask = masked_by_order(order, k)
    assert mask.sum(1).tolist() == [k] * b
    for row in range(b):
        assert set(order[row, n - k:].tolist()) == set(mask[row].nonzero().flatten().tolist())


def test_training_masks_one_ratio_per_batch_over_the_last_of_random_orders() -> None:
    model = shared()
    torch.manual_seed(1)
    orders = model.orders(64, device=torch.device("cpu"))
    assert torch.equal(orders.sort(1).values, torch.arange(N).expand(64, -1))  # permutations
    assert len({tuple(o) for o in orders.tolist()}) == 64  # independent per image
    counts = [model.num_masked() for _ in range(500)]
    assert min(counts) >= math.ceil(0.7 * N) and max(counts) <= N
    raster = make(order="raster").orders(2, device=torch.device("cpu"))
    assert raster.tolist() == [list(range(N))] * 2


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 80))
def test_sampling_reveals_every_token_exactly_once(n: int, num_iter: int) -> None:
    revealed = revealed_per_step(n, num_iter)
    assert len(revealed) == num_iter and sum(revealed) == n and min(revealed) >= 0
    assert revealed[-1] >= 1  # the last step predicts what is left
    if num_iter <= n:
        assert min(revealed[:-1] or [1]) >= 1 or n < 2  # at most one token per step: each step predicts some


def test_mask_schedule_is_marss_cosine_by_hand() -> None:
    # N = 16, K = 4: floor(16·cos(π/8)) = 14, floor(16·cos(π/4)) = 11, floor(16·cos(3π/8)) = 6, then MAR's clamp: 1
    assert mask_schedule(16, 4) == [14, 11, 6, 1]
    assert revealed_per_step(16, 4) == [2, 3, 5, 6]
    assert mask_schedule(4, 8) == [3, 2, 1, 1, 1, 1, 1, 1]  # the clamp keeps one token back for the last step
    assert revealed_per_step(4, 8) == [1, 1, 1, 0, 0, 0, 0, 1]


# --- the networks ---------------------------------------------------------------------------------------------------


def test_bidirectional_conditions_ignore_masked_token_values() -> None:
    model = shared()
    x, labels = tokens()
    seq = model.sequence(x)
    order = model.orders(3, device=torch.device("cpu"))
    mask = masked_by_order(order, 10)
    z = model.forward_mae_decoder(model.forward_mae_encoder(seq, mask, model.class_embedding(labels)), mask)
    changed = torch.where(mask[..., None], torch.randn_like(seq), seq)
    z2 = model.forward_mae_decoder(model.forward_mae_encoder(changed, mask, model.class_embedding(labels)), mask)
    assert torch.allclose(z, z2, atol=1e-6)
    unmasked = torch.where(mask[..., None], seq, seq + 1)
    z3 = model.forward_mae_decoder(model.forward_mae_encoder(unmasked, mask, model.class_embedding(labels)), mask)
    assert not torch.allclose(z, z3, atol=1e-3)  # the visible tokens do matter


@pytest.mark.parametrize("order", ["raster", "random"])
def test_causal_condition_j_sees_exactly_the_tokens_before_j_in_the_order(order: str) -> None:
    model = shared("causal", order)
    x, labels = tokens(1)
    seq = model.sequence(x)
    torch.manual_seed(3)
    o = model.orders(1, device=torch.device("cpu"))
    base = model.causal_forward(seq, o, model.class_embedding(labels))
    for k in range(N):  # perturb the k-th token of the order: targets j ≤ k unchanged, j > k changed
        changed = seq.clone()
        changed[0, o[0, k]] += 1.0
        diff = (model.causal_forward(changed, o, model.class_embedding(labels)) - base).abs().amax(-1)[0]
        assert diff[: k + 1].max() < 1e-6
        assert (diff[k + 1:] > 1e-5).all()


@pytest.mark.parametrize("order", ["raster", "random"])
@pytest.mark.parametrize("spec", [VAE, VQ])
def test_cached_causal_passes_equal_the_teacher_forced_pass(order: str, spec: TokenSpec) -> None:
    model = shared("causal", order, spec)
    x, labels = tokens(2, spec)
    seq = model.sequence(x)
    o = model.orders(2, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    class_emb = model.class_embedding(labels)
    full = model.causal_forward(seq, o, class_emb)
    from arvision.nn.attention import KVCache
    buf = model.buffer_size
    caches = [KVCache(buf + N - 1) for _ in range(4)]
    in_order = seq.gather(1, o if seq.ndim == 2 else o[..., None].expand_as(seq))
    steps = []
    for j in range(N):
        start, end = (0, buf) if j == 0 else (buf + j - 1, buf + j)
        z = model.causal_pass(start, end, in_order, o, class_emb, caches)[:, -1]
        steps.append(z + model.diffusion_pos_embed_learned[0][o[:, j]])
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_parameter_names_are_marss_state_dict() -> None:
    names = set(make(depth=1, decoder_depth=1, head_depth=1).state_dict())
    expected = {"class_emb.weight", "fake_latent", "z_proj.weight", "z_proj_ln.bias", "encoder_pos_embed_learned",
                "encoder_blocks.0.norm1.weight", "encoder_blocks.0.attn.qkv.bias", "encoder_blocks.0.attn.proj.weight",
                "encoder_blocks.0.mlp.fc1.weight", "encoder_blocks.0.mlp.fc2.bias", "encoder_norm.weight",
                "decoder_embed.weight", "mask_token", "decoder_pos_embed_learned", "decoder_blocks.0.norm2.weight",
                "decoder_norm.bias", "diffusion_pos_embed_learned", "diffloss.net.time_embed.mlp.0.weight",
                "diffloss.net.time_embed.mlp.2.bias", "diffloss.net.cond_embed.weight", "diffloss.net.input_proj.bias",
                "diffloss.net.res_blocks.0.in_ln.weight", "diffloss.net.res_blocks.0.mlp.0.weight",
                "diffloss.net.res_blocks.0.mlp.2.bias", "diffloss.net.res_blocks.0.adaLN_modulation.1.weight",
                "diffloss.net.final_layer.linear.weight", "diffloss.net.final_layer.adaLN_modulation.1.bias"}
    assert expected <= names
    assert not any("norm_final" in n for n in names)  # MAR's final LayerNorm has no affine parameters
    model = make()
    assert model.encoder_pos_embed_learned.shape == (1, N + 3, 32) and model.mask_token.shape == (1, 1, 32)
    assert model.no_weight_decay() == {n for n, _ in model.named_parameters() if n.startswith("diffloss.")}


# --- the diffusion head and its process ------------------------------------------------------------------------------


def test_cosine_schedule_and_respacing_are_iddpms() -> None:
    process = LearnedVarianceDiffusion()
    s = torch.arange(1001, dtype=torch.float64) / 1000
    f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    alpha_bar = torch.cumprod(1 - betas_for("cosine", 1000), 0)
    assert torch.allclose(alpha_bar[:500], (f[1:] / f[0])[:500], rtol=1e-9)  # before β's 0.999 clip bites
    assert process.num_timesteps == 1000 and process.timestep_map == list(range(1000))
    kept = space_timesteps(1000, 100)
    assert len(kept) == 100 and kept[:3] == [0, 10, 20] and kept[-1] == 999  # stride 999/99, rounded
    spaced = LearnedVarianceDiffusion(timesteps=kept)
    # respacing keeps ᾱ at the kept steps: its β's are 1 − ᾱ_k / ᾱ_{k−1} over the kept ones
    kept_alpha_bar = spaced.tables["sqrt_alpha_bar"] ** 2
    assert torch.allclose(kept_alpha_bar, alpha_bar[kept], rtol=1e-12)


def test_diffusion_loss_terms_by_hand() -> None:
    """A zero network output: ε̂ = 0 and v = 0 (log σ² halfway between log β̃ and log β): mse = mean ε², vb = KL of
    two Gaussians in bits (t > 0) and the discretised decoder NLL (t = 0)."""
    process = LearnedVarianceDiffusion()
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, generator=gen) * 0.5, torch.randn(6, 4, generator=gen)
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    x_t = process.add_noise(x0, noise, t)
    mse, vb = process.loss_terms(torch.zeros(6, 8), x0, x_t, noise, t)
    assert torch.allclose(mse, noise.pow(2).mean(1))
    b = betas_for("cosine", 1000)
    ab = torch.cumprod(1 - b, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    tilde = b * (1 - ab_prev) / (1 - ab)
    tilde[0] = tilde[1]
    for i, step in enumerate(t.tolist()):
        coef0 = (b[step] * ab_prev[step].sqrt() / (1 - ab[step])).item()
        coef_t = ((1 - ab_prev[step]) * (1 - b[step]).sqrt() / (1 - ab[step])).item()
        true_mean = coef0 * x0[i].double() + coef_t * x_t[i].double()
        x0_hat = x_t[i].double() / ab[step].sqrt()
        model_mean = coef0 * x0_hat + coef_t * x_t[i].double()
        log_var = 0.5 * (b[step].log() + tilde[step].log())
        if step == 0:
            normal = torch.distributions.Normal(model_mean, (0.5 * log_var).exp())
            prob = normal.cdf(x0[i].double() + 1 / 255) - normal.cdf(x0[i].double() - 1 / 255)
            expected = -(prob.log()).mean() / math.log(2)
            assert vb[i].item() == pytest.approx(expected.item(), rel=2e-3)  # ADM's tanh approximation of Φ
        else:
            q = torch.distributions.Normal(true_mean, tilde[step].sqrt())
            p = torch.distributions.Normal(model_mean, (0.5 * log_var).exp())
            expected = torch.distributions.kl_divergence(q, p).mean() / math.log(2)
            assert vb[i].item() == pytest.approx(expected.item(), rel=1e-3, abs=1e-6)


def test_vlb_trains_the_variance_only() -> None:
    head = DiffusionHead(channels=4, cond_dim=8, width=16, depth=1)
    torch.nn.init.normal_(head.net.final_layer.linear.weight, std=0.3)
    torch.manual_seed(0)
    x0, z = torch.randn(32, 4), torch.randn(32, 8)
    mse, vb = head.terms(x0, z)
    out = head.net.final_layer.linear
    grad_w = torch.autograd.grad(vb.mean(), out.weight)[0]
    assert grad_w[:4].abs().max() == 0 and grad_w[4:].abs().max() > 0  # ε rows untouched by the VLB
    torch.manual_seed(0)
    loss = head.loss(x0, z, mask=torch.tensor([1.0] * 16 + [0.0] * 16))
    torch.manual_seed(0)
    mse, vb = head.terms(x0, z)
    assert loss.item() == pytest.approx((mse + vb)[:16].mean().item(), rel=1e-6)  # masked rows only


def test_head_sampling_temperature_scales_the_step_noise() -> None:
    head = DiffusionHead(channels=4, cond_dim=8, width=16, depth=1)
    torch.nn.init.normal_(head.net.final_layer.linear.weight, std=0.3)
    z, noise = torch.randn(5, 8), torch.randn(5, 4)

    def run(temperature: float, seed: int) -> torch.Tensor:
        steps = [torch.randn(5, 4, generator=torch.Generator().manual_seed(seed + i)) for i in range(10)]
        return head.sample(z, temperature=temperature, steps=10, noise=noise, step_noise=steps)

    assert torch.equal(run(0.0, 0), run(0.0, 100))  # τ = 0: the mean path, whatever the step noise
    assert not torch.allclose(run(1.0, 0), run(1.0, 100))
    assert head.sampling_diffusion(10).timestep_map == space_timesteps(1000, 10)


def test_cfg_guides_eps_and_keeps_the_conditional_variance() -> None:
    process = LearnedVarianceDiffusion(timesteps=space_timesteps(1000, 3))
    calls = []

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], t.tolist()))
        cond = torch.cat([torch.full_like(x[:2], 1.0), torch.full_like(x[:2], 0.5)], -1)
        uncond = torch.cat([torch.full_like(x[:2], -1.0), torch.full_like(x[:2], -0.5)], -1)
        return torch.cat([cond, uncond])

    noise = torch.zeros(2, 4)
    out = process.sample(model_fn, noise, cfg=3.0, temperature=0.0).sample
    assert [c[0] for c in calls] == [4, 4, 4] and calls[0][1] == [999] * 4 and calls[-1][1] == [0] * 4
    # reference: the same chain with a model that returns the guided ε (−1 + 3·2 = 5) and v = 0.5
    ref = process.sample(lambda x, t: torch.cat([torch.full_like(x, 5.0), torch.full_like(x, 0.5)], -1), noise,
                         temperature=0.0).sample
    assert torch.allclose(out, ref)


def test_clip_denoised_bounds_a_diverging_chain() -> None:
    """An ε off by 0.05 at t = 999 is amplified by 1/√ᾱ_999 ≈ 10⁴ in the x0 prediction (what an undertrained head
    does at the first step), and a network that cannot follow inputs beyond its training range (here: ±3) never
    recovers; clamping x0 keeps every step's mean inside the clamp's range."""
    process = LearnedVarianceDiffusion(timesteps=space_timesteps(1000, 20))

    def off_by_a_little(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.clamp(-3, 3) + 0.05, torch.zeros_like(x)], -1)

    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    wild = process.sample(off_by_a_little, noise, temperature=0.0).sample
    tame = process.sample(off_by_a_little, noise, temperature=0.0, clip_denoised=3.0).sample
    assert wild.abs().max() > 100 and tame.abs().max() <= 3.0 + 1e-4


# --- sampling ---------------------------------------------------------------------------------------------------------


def counted_sample(model: MARGenerator, **settings) -> tuple[int, int, torch.Tensor]:
    backbone, head = [], []
    hooks = [model.encoder_blocks[0].register_forward_hook(lambda m, i, o: backbone.append(i[0].shape[0]))]
    if isinstance(model.diffloss, DiffusionHead):
        hooks.append(model.diffloss.net.register_forward_hook(lambda m, i, o: head.append(i[0].shape[0])))
    out = model.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0), **settings)
    for h in hooks:
        h.remove()
    return len(backbone), len(head), out


@pytest.mark.parametrize("attention,num_iter", [("bidirectional", 4), ("bidirectional", 24), ("causal", 4)])
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_sampling_cost_counts_what_sampling_runs(attention: str, num_iter: int, cfg: float) -> None:
    model = shared(attention)
    backbone, head, out = counted_sample(model, cfg=cfg, num_iter=num_iter, num_sampling_steps=3)
    cost = model.sampling_cost(cfg=cfg, num_iter=num_iter, num_sampling_steps=3)
    assert (cost.backbone_passes, cost.head_passes) == (backbone, head)
    assert cost.rows_per_pass_factor == (2 if cfg != 1.0 else 1)
    if attention == "causal":
        assert backbone == N
    else:
        assert backbone == num_iter and head == 3 * sum(1 for r in revealed_per_step(N, num_iter) if r)
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()


def test_sampling_is_seeded_and_restores_the_mode() -> None:
    model = make().train()
    kw = dict(cfg=2.0, num_iter=4, num_sampling_steps=3)
    a = model.sample(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(5), **kw)
    b = model.sample(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(5), **kw)
    c = model.sample(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(6), **kw)
    assert model.training and torch.equal(a, b) and not torch.equal(a, c)


def test_linear_cfg_ramp_follows_the_clamped_mask_count() -> None:
    model = shared()
    assert [model.step_cfg(3.0, n, "linear") for n in mask_schedule(N, 4)] == pytest.approx(
        [1 + 2 * (16 - n) / 16 for n in (14, 11, 6, 1)])
    assert model.step_cfg(3.0, 5, "constant") == 3.0


def test_confidence_remasking_keeps_the_least_likely_codes_masked(monkeypatch) -> None:
    model = make(VQ)
    seen = []
    original = CrossEntropyHead.sample_with_log_prob

    def spy(self, z, **kw):
        out = original(self, z, **kw)
        seen.append(out)
        return out

    monkeypatch.setattr(CrossEntropyHead, "sample_with_log_prob", spy)
    out = model.sample(torch.tensor([3]), num_iter=4, choice_temperature=0.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 4, 4) and out.dtype == torch.long and 0 <= out.min() and out.max() < 32
    # step 1 sampled all 16 codes; the 14 least likely stayed masked, the 2 most likely were kept
    codes, log_p = seen[0]
    kept = log_p.topk(2).indices
    assert len(seen) == 4 and seen[1][0].shape == (14,)
    assert set(out.flatten()[kept].tolist()) <= set(codes[kept].tolist())
    assert torch.equal(out.flatten()[kept], codes[kept])


# --- the switches -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,head,needs", [
    (VQ, "diffusion", "a continuous tokenizer (tokenizer=vae)"),
    (VAE, "cross_entropy", "a discrete single-grid tokenizer (tokenizer=vq)"),
    (TokenSpec(name="msvq", kind="discrete", layout="scales", grid=(4, 4), dim=8, vocab_size=32, scales=(1, 2, 4)),
     "auto", "a discrete single-grid tokenizer (tokenizer=vq)"),
])
def test_bad_tokenizer_head_pairs_fail_with_one_sentence(spec: TokenSpec, head: str, needs: str) -> None:
    with pytest.raises(IncompatibleTokenizer) as err:
        MARGenerator(spec=spec, num_classes=NUM_CLASSES, head=head)
    message = str(err.value)
    assert message.startswith(f"mar needs {needs}") and message.endswith(f"got tokenizer={spec.name}")
    assert "\n" not in message


def test_bad_switches_fail_before_any_work() -> None:
    for bad in ({"order": "spiral"}, {"attention": "sparse"}, {"head": "l2"}, {"buffer_size": 0}):
        with pytest.raises(ValueError, match=f"generator.model.{next(iter(bad))}"):
            MARGenerator(spec=VAE, num_classes=NUM_CLASSES, **bad)
    with pytest.raises(ValueError, match="remask=confidence needs generator.model.head=cross_entropy"):
        shared().sample(torch.tensor([0]), remask="confidence")
    with pytest.raises(ValueError, match="remask=confidence needs"):
        make(VQ, attention="causal").sample(torch.tensor([0]), remask="confidence")
    with pytest.raises(ValueError, match="sample.cfg_schedule"):
        shared().sample(torch.tensor([0]), cfg_schedule="cosine")


@pytest.mark.parametrize("spec", [VAE, VQ])
@pytest.mark.parametrize("attention,order", [("bidirectional", "random"), ("bidirectional", "raster"),
                                             ("causal", "random"), ("causal", "raster")])
def test_every_table1_cell_trains_and_samples(spec: TokenSpec, attention: str, order: str) -> None:
    model = make(spec, attention=attention, order=order).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, labels = tokens(8, spec)
    losses = []
    for _ in range(25):
        torch.manual_seed(0)  # the same masks, t and noise each step: the loss must fall
        loss = model.loss(x, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    out = model.sample(labels[:2], cfg=1.5, num_iter=3, num_sampling_steps=2, generator=torch.Generator())
    assert out.shape == (2, *((4, 4, 4) if spec is VAE else (4, 4)))
    if spec is VQ:
        assert out.dtype == torch.long and out.max() < 32


# --- runs ---------------------------------------------------------------------------------------------------------------


def test_tiny_run_end_to_end(tiny_cfg, tmp_path) -> None:
    from arvision.pipeline import run as train
    cfg = tiny_cfg("tokenizer=vae", "generator=mar")
    results = train(cfg, tmp_path / "run")
    gen = results["metrics"]["generator"]
    assert gen["test_loss"]["value"] < untrained_test_loss(cfg, results)  # training lowered the held-out loss
    assert gen["nfe_per_image"] == 4 + 4 * 5  # num_iter=4 passes + 4 head runs × 5 respaced steps (debug=tiny)


@pytest.mark.slow  # a fresh process: ≈ 14 s
def test_arvision_train_cli_runs_mar_on_the_vae(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "arvision.cli.train", "generator=mar", "tokenizer=vae", "debug=tiny",
                           "data=shapes"], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vae" in done.stdout and "mar" in done.stdout


def test_killed_run_resumes_to_the_same_weights(tiny_cfg, tmp_path, monkeypatch) -> None:
    from arvision import pipeline
    overrides = ("tokenizer=vae", "generator=mar", "generator.train.max_steps=6", "checkpoint_every=2",
                 "evaluate=false")
    pipeline.run(tiny_cfg(*overrides), tmp_path / "straight")
    run_crashing_at(monkeypatch, tiny_cfg(*overrides), tmp_path / "resumed", 3)
    pipeline.run(tiny_cfg(*overrides), tmp_path / "resumed")
    a, b = (torch.load(tmp_path / run / "generator.pt", weights_only=True) for run in ("straight", "resumed"))
    for part in ("generator", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.allclose(a[part][key], b[part][key], atol=1e-6), (part, key)
