"""ACDiT: the skip-causal mask, its FlexAttention form, cached block denoising, the DiT limit, loss and sampling."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.generators import IncompatibleTokenizer
from arvision.generators.acdit import (ACDiTGenerator, skip_causal_mask, skip_causal_mask_mod,
                                       without_last_clean_block)
from arvision.nn.masks import dense_from_mask_mod, flex_available, flex_block_mask
from arvision.nn.processes import SPACINGS, GaussianDiffusion
from arvision.nn.rope import apply_rope_nd, rope_nd, ropend_bases
from arvision.tokenizers.base import TokenSpec
from tests.conftest import untrained_test_loss

VAE = TokenSpec(name="vae", kind="continuous", layout="grid", grid=(8, 8), dim=4, image_size=32, image_channels=1)
VQ = TokenSpec(name="vq", kind="discrete", layout="grid", grid=(8, 8), dim=8, vocab_size=32)
NUM_CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# arvision's earlier block, kept as options: SwiGLU, no attention biases, no QK norm, LlamaGen's 2D RoPE
EARLIER = dict(mlp="swiglu", attn_bias=False, qk_norm=False, rope="rope2d")


def make(block_size: int = 16, *, patch_size: int = 1, spec: TokenSpec = VAE, seed: int = 0,
         attention: str = "sdpa", randomise: bool = True, variant: tuple = ()) -> ACDiTGenerator:
    """A small eval-mode model (the official block, or `variant`'s options); `randomise` replaces the zero
    (adaLN-Zero, output) initialisation by random weights so that every path through the network matters."""
    torch.manual_seed(seed)
    model = ACDiTGenerator(spec=spec, num_classes=NUM_CLASSES, dim=32, depth=2, heads=2, block_size=block_size,
                           patch_size=patch_size, attention=attention, **dict(variant))
    if randomise:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or "final_layer.linear" in name:
                    p.normal_(0, 0.2)
    return model.eval()


@functools.cache
def shared(block_size: int = 16, patch_size: int = 1, variant: tuple = ()) -> ACDiTGenerator:
    return make(block_size, patch_size=patch_size, variant=variant)


def inputs(model: ACDiTGenerator, b: int = 2, seed: int = 0):
    """Clean blocks, noisy blocks, per-block timesteps and labels."""
    gen = torch.Generator().manual_seed(seed)
    x0 = model.to_blocks(torch.randn(b, *((model.spec.dim,) + model.spec.grid), generator=gen))
    x_t = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (b, model.num_blocks), generator=gen)
    return x0, x_t, t, torch.randint(0, NUM_CLASSES, (b,), generator=gen)


# --- the mask ---------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 6), n=st.integers(1, 6))
def test_skip_causal_mask_properties(k: int, n: int) -> None:
    """Clean never sees noisy; clean block i sees exactly clean blocks ≤ i; noisy block i sees exactly clean blocks
    < i and noisy block i; the block construction equals the reference mask_mod."""
    mask = skip_causal_mask(k, n)
    assert mask.shape == (2 * n * k, 2 * n * k) and mask.dtype == torch.bool
    block = torch.arange(2 * n * k) // k
    clean = block < n
    assert not mask[clean][:, ~clean].any()
    for q in range(2 * n * k):
        i = block[q].item() % n
        if clean[q]:
            expected = clean & (block <= i)
        else:
            expected = (clean & (block < i)) | (block == n + i)
        assert torch.equal(mask[q], expected), q
    assert torch.equal(dense_from_mask_mod(skip_causal_mask_mod(k, n), 2 * n * k, 2 * n * k), mask)


def test_skip_causal_mask_small_case_by_hand() -> None:
    """N = 2 blocks of one token: [c0 c1 | n0 n1]."""
    expected = torch.tensor([[1, 0, 0, 0],
                             [1, 1, 0, 0],
                             [0, 0, 1, 0],
                             [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(skip_causal_mask(1, 2), expected)


@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
def test_training_mask_drops_only_the_unseen_last_clean_block(block_size: int) -> None:
    model = shared(block_size)
    n, k, L = model.num_blocks, block_size, model.seq_len
    full = skip_causal_mask(k, n)
    assert not full[L:, (n - 1) * k:L].any()  # no noisy token looks at c_{N−1}: leaving it out is exact
    keep = torch.cat([torch.arange((n - 1) * k), torch.arange(L, 2 * L)])
    assert torch.equal(model.train_mask, full[keep][:, keep])
    size = model.train_mask.shape[0]
    mod = without_last_clean_block(skip_causal_mask_mod(k, n), k, n)
    assert torch.equal(dense_from_mask_mod(mod, size, size), model.train_mask)


@pytest.mark.skipif(not flex_available(), reason="FlexAttention needs torch >= 2.5")
@pytest.mark.parametrize(("k", "n"), [(4, 4), (16, 4), (1, 8), (3, 5)])
def test_flex_block_mask_equals_the_dense_mask(k: int, n: int) -> None:
    """Attention through the BlockMask with equal scores and one-hot values returns, per query, the uniform
    distribution over the keys it may see: its support must be the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention
    size = 2 * n * k
    block_mask = flex_block_mask(skip_causal_mask_mod(k, n), size, size)
    assert torch.equal(dense_from_mask_mod(block_mask.mask_mod, size, size), skip_causal_mask(k, n))
    q = torch.zeros(1, 1, size, 8)
    v = torch.eye(size)[None, None]
    with torch.no_grad():
        weights = flex_attention(q, q, v, block_mask=block_mask)[0, 0]
    assert torch.equal(weights > 0, skip_causal_mask(k, n))
    torch.testing.assert_close(weights.sum(-1), torch.ones(size))


@pytest.mark.skipif(not flex_available(), reason="FlexAttention needs torch >= 2.5")
def test_flex_and_sdpa_models_agree() -> None:
    sdpa = shared(16)
    flex = make(16, attention="flex")
    flex.load_state_dict(sdpa.state_dict())
    x0, x_t, t, labels = inputs(sdpa)
    with torch.no_grad():
        torch.testing.assert_close(flex(x0, x_t, t, labels), sdpa(x0, x_t, t, labels), atol=1e-5, rtol=1e-4)


# --- layout and construction ------------------------------------------------------------------------------------

def test_rejects_discrete_tokenizers() -> None:
    with pytest.raises(IncompatibleTokenizer, match=r"acdit needs a continuous tokenizer \(tokenizer=vae\); "
                                                    r"got tokenizer=vq"):
        make(spec=VQ)


@pytest.mark.parametrize(("block_size", "patch_size"), [(8, 1), (2, 1), (32, 1), (9, 1), (64, 2), (0, 1)])
def test_block_size_must_be_a_square_that_tiles_the_grid(block_size: int, patch_size: int) -> None:
    with pytest.raises(ValueError, match=r"block_size must be .* one of \[1, 4, 16(, 64)?\]; got"):
        make(block_size, patch_size=patch_size)


def test_blocks_are_square_and_in_raster_order() -> None:
    """Block b of a 4×4-block model holds the 4×4 square at block-row b // 2, block-column b % 2, raster inside."""
    model = shared(16)
    latents = torch.arange(8 * 8).float().reshape(1, 1, 8, 8).expand(1, 4, 8, 8)
    blocks = model.to_blocks(latents)  # (1, 4, 16, 4)
    for b in range(4):
        r, c = divmod(b, 2)
        assert torch.equal(blocks[0, b, :, 0], latents[0, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4].flatten())
    torch.testing.assert_close(model.from_blocks(blocks), latents)
    patched = shared(4, 2)  # patch 2: 4×4 tokens of 16 channels, blocks of 2×2 tokens
    assert patched.to_blocks(latents).shape == (1, 4, 4, 16)
    torch.testing.assert_close(patched.from_blocks(patched.to_blocks(latents)), latents)


# --- the block: official by default, arvision's earlier choices as options ---------------------------------------

def test_default_block_is_the_official_one() -> None:
    layer = shared(16).layers[0]
    names = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert names == {"attention_norm.weight": (32,), "attention.wqkv.weight": (96, 32), "attention.wqkv.bias": (96,),
                     "attention.wo.weight": (32, 32), "attention.wo.bias": (32,), "attention.q_norm.weight": (16,),
                     "attention.k_norm.weight": (16,), "ffn_norm.weight": (32,),
                     "feed_forward.fc1.weight": (128, 32), "feed_forward.fc1.bias": (128,),   # GELU, 4× wide
                     "feed_forward.fc2.weight": (32, 128), "feed_forward.fc2.bias": (32,),
                     "adaLN_modulation.1.weight": (192, 32), "adaLN_modulation.1.bias": (192,)}
    assert shared(16).rope.shape == (64, 16, 2)  # RopeND: cos/sin per channel
    earlier = shared(16, 1, tuple(EARLIER.items()))
    assert {name for name, _ in earlier.layers[0].named_parameters()} == {
        "attention_norm.weight", "attention.wqkv.weight", "attention.wo.weight", "ffn_norm.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"}
    assert earlier.rope.shape == (64, 8, 2)  # LlamaGen's 2D RoPE: cos/sin per channel pair


def test_gelu_mlp_uses_the_tanh_approximation() -> None:
    mlp = shared(16).layers[0].feed_forward
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh"))
        assert torch.equal(mlp(x), expected)
        assert not torch.allclose(mlp(x), mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))), atol=1e-7)


def test_ropend_bases_and_table_by_hand() -> None:
    """head_dim 8 over (row, col): each axis gets 4 channels with frequencies 1/100^(linspace(0, 8, 2)/8) = 1, 0.01,
    written twice; channel c (row) is rotated with channel c + 4 (column) as rotate-half does."""
    assert ropend_bases([8, 32, 39, 40, 64, 1024]) == [100, 100, 100, 200, 200, 2700]
    table = rope_nd(torch.tensor([[2, 3]]), 8, max_lens=[8, 8])
    row, col = torch.tensor([2.0, 0.02, 2.0, 0.02]), torch.tensor([3.0, 0.03, 3.0, 0.03])
    angles = torch.cat([row, col])
    torch.testing.assert_close(table[0], torch.stack([angles.cos(), angles.sin()], dim=-1))
    x = torch.arange(1.0, 9.0)[None]
    got = apply_rope_nd(x, table)[0]
    expected = torch.cat([x[0, :4] * row.cos() - x[0, 4:] * row.sin(), x[0, 4:] * col.cos() + x[0, :4] * col.sin()])
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="multiple of 4"):
        rope_nd(torch.zeros(1, 2), 6, max_lens=[8, 8])


def test_rejects_unknown_block_options() -> None:
    with pytest.raises(ValueError, match="mlp must be one of"):
        ACDiTGenerator(spec=VAE, num_classes=NUM_CLASSES, dim=32, depth=1, heads=2, mlp="relu")
    with pytest.raises(ValueError, match="rope must be one of"):
        ACDiTGenerator(spec=VAE, num_classes=NUM_CLASSES, dim=32, depth=1, heads=2, rope="rope1d")


# --- the network ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("block_size", "patch_size", "variant"),
                         [(16, 1, ()), (4, 1, ()), (1, 1, ()), (64, 1, ()), (4, 2, ()),
                          (16, 1, tuple(EARLIER.items())), (4, 2, tuple(EARLIER.items()))])
def test_cached_block_denoising_equals_the_training_forward(block_size: int, patch_size: int, variant: tuple) -> None:
    """ε of noisy block i through the KV cache (filled by clean passes of blocks < i) equals the prediction of the
    full masked training forward over [clean prefix | noisy blocks]; for the official block and the earlier one."""
    model = shared(block_size, patch_size, variant)
    x0, x_t, t, labels = inputs(model)
    with torch.no_grad():
        full = model(x0, x_t, t, labels)
        caches = model.new_caches()
        for i in range(model.num_blocks):
            torch.testing.assert_close(model.denoise(x_t[:, i], t[:, i], labels, i, caches), full[:, i],
                                       atol=2e-5, rtol=1e-4)
            assert all(c.length == i * block_size for c in caches)  # the noisy pass left no trace
            model.extend_context(x0[:, i], i, caches)


def test_block_i_depends_on_clean_blocks_before_it_and_its_own_noisy_block_only() -> None:
    model = shared(16)
    x0, x_t, t, labels = inputs(model)
    with torch.no_grad():
        base = model(x0, x_t, t, labels)
        for j in range(model.num_blocks):
            for which in ("clean", "noisy", "t"):
                c, n, tt = x0.clone(), x_t.clone(), t.clone()
                if which == "clean":
                    c[:, j] += 1.0
                elif which == "noisy":
                    n[:, j] += 1.0
                else:
                    tt[:, j] = (tt[:, j] + 500) % 1000
                changed = (model(c, n, tt, labels) - base).abs().amax(dim=(0, 2, 3)) > 1e-5
                expected = torch.arange(model.num_blocks) > j if which == "clean" else \
                    torch.arange(model.num_blocks) == j
                assert torch.equal(changed, expected), (j, which)


def test_one_block_is_a_plain_dit() -> None:
    """block_size = L: one noisy block attending to itself only, no clean context, no mask: DiT."""
    model = shared(64)
    assert model.num_blocks == 1 and model.train_mask.shape == (64, 64) and model.train_mask.all()
    x0, x_t, t, labels = inputs(model)
    with torch.no_grad():
        x = model.x_embedder(x_t[:, 0])
        cond = model.t_embedder(t) + model.y_embedder.embedding_table(labels)[:, None]
        for layer in model.layers:  # DiT: every token attends to every token
            x = layer(x, cond, clean_len=0, block_size=64, rope=model.rope)
        dit = model.final_layer(x, cond, block_size=64)
        torch.testing.assert_close(model(x0, x_t, t, labels)[:, 0], dit, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(torch.randn_like(x0), x_t, t, labels), model(x0, x_t, t, labels))


def test_loss_is_finite_and_reaches_every_parameter() -> None:
    model = make(16).train()
    x0, _, _, labels = inputs(model, b=4)
    out = model.loss(model.from_blocks(x0), labels)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_adaln_zero_initialisation_predicts_zero_noise() -> None:
    """At initialisation the output layer is zero, so ε̂ = 0 and the loss is E[ε²] ≈ 1."""
    model = make(16, randomise=False).train()
    x0, x_t, t, labels = inputs(model, b=8)
    assert model(x0, x_t, t, labels).abs().max() == 0
    torch.manual_seed(0)
    assert abs(model.loss(model.from_blocks(x0), labels)["loss"].item() - 1.0) < 0.1


# --- sampling ---------------------------------------------------------------------------------------------------

def reference_sample(model: ACDiTGenerator, labels: torch.Tensor, *, cfg: float, steps: int, sampler: str,
                     seed: int) -> torch.Tensor:
    """Block-by-block sampling without any cache: every ε evaluation reruns the full masked training forward over
    the finished blocks (as clean context) and the block being denoised (other noisy slots hold zeros, which the
    mask hides from it)."""
    gen = torch.Generator().manual_seed(seed)
    b, n, k, c = labels.shape[0], model.num_blocks, model.block_size, model.token_dim
    rows = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)]) if cfg != 1.0 else labels
    finished = torch.zeros(b, n, k, c)
    for i in range(n):
        noise = torch.randn((b, k, c), generator=gen)

        def eps_fn(x_t: torch.Tensor, t: torch.Tensor, i: int = i) -> torch.Tensor:
            clean = finished.repeat(x_t.shape[0] // b, 1, 1, 1)
            noisy = torch.zeros_like(clean)
            noisy[:, i] = x_t
            tt = torch.zeros(x_t.shape[0], n, dtype=torch.long)
            tt[:, i] = t
            return model(clean, noisy, tt, rows)[:, i]

        if sampler == "ddim":
            finished[:, i] = model.diffusion.ddim(eps_fn, noise, steps, cfg=cfg, spacing="leading").sample
        else:
            finished[:, i] = model.diffusion.dpm_solver_pp_2m(eps_fn, noise, steps, cfg=cfg, spacing="linspace").sample
    return model.from_blocks(finished)


@pytest.mark.parametrize(("block_size", "cfg", "sampler"), [(16, 1.0, "dpm_solver_pp"), (16, 3.0, "ddim"),
                                                            (4, 2.0, "dpm_solver_pp"), (64, 2.0, "ddim")])
def test_cached_sampling_equals_full_recomputation(block_size: int, cfg: float, sampler: str) -> None:
    model = shared(block_size)
    labels = torch.tensor([1, 7])
    with torch.no_grad():
        expected = reference_sample(model, labels, cfg=cfg, steps=3, sampler=sampler, seed=5)
    spacing = "leading" if sampler == "ddim" else "linspace"  # DDIM's own default; DPM-Solver's (the official)
    got = model.sample(labels, cfg=cfg, steps=3, sampler=sampler, spacing=spacing,
                       generator=torch.Generator().manual_seed(5))
    assert got.shape == (2, 4, 8, 8) and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_reproducible() -> None:
    model = shared(16)
    labels = torch.tensor([0, 3, 3])
    a = model.sample(labels, cfg=2.0, steps=4, generator=torch.Generator().manual_seed(0))
    b = model.sample(labels, cfg=2.0, steps=4, generator=torch.Generator().manual_seed(0))
    c = model.sample(labels, cfg=2.0, steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not model.training


@pytest.mark.parametrize(("block_size", "cfg", "steps"), [(16, 1.0, 3), (16, 1.5, 2), (64, 2.0, 3), (1, 1.0, 1)])
def test_sampling_cost_counts_the_backbone_passes(block_size: int, cfg: float, steps: int) -> None:
    """N·steps denoising passes plus N − 1 clean passes, every one over K tokens and 2B rows under CFG."""
    model = shared(block_size)
    seen: list[tuple[int, int]] = []
    handle = model.layers[0].register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[:2])))
    try:
        model.sample(torch.tensor([2, 4]), cfg=cfg, steps=steps, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    cost = model.sampling_cost(cfg=cfg, steps=steps)
    n = model.num_blocks
    assert cost.to_dict() == {"passes": n * steps + n - 1, "backbone_passes": n * steps + n - 1, "head_passes": 0,
                              "rows_per_pass_factor": 2 if cfg != 1.0 else 1}
    assert len(seen) == cost.backbone_passes == cost.passes
    assert set(seen) == {(2 * cost.rows_per_pass_factor, block_size)}


# --- DPM-Solver++ timesteps as diffusers spaces them -----------------------------------------------------------

# The official sampler: DPMSolverMultistepScheduler.from_config(DDIMScheduler().config), 25 steps. diffusers drops
# the config entries that were defaults, so the solver keeps its "linspace" spacing (checked with diffusers 0.31.0,
# the version the official code pins, and 0.42.1).
OFFICIAL_25 = [999, 959, 919, 879, 839, 799, 759, 719, 679, 639, 599, 559, 519, 480, 440, 400, 360, 320, 280, 240,
               200, 160, 120, 80, 40]
# DPM-Solver's own "leading" (a scheduler built with timestep_spacing="leading", steps_offset 0)
DPM_LEADING_25 = [950, 912, 874, 836, 798, 760, 722, 684, 646, 608, 570, 532, 494, 456, 418, 380, 342, 304, 266, 228,
                  190, 152, 114, 76, 38]


def test_official_and_leading_timesteps_without_diffusers() -> None:
    diffusion = GaussianDiffusion()
    assert diffusion.inference_timesteps(25, "linspace", solver="dpm_solver") == OFFICIAL_25
    assert diffusion.inference_timesteps(25, "leading", solver="dpm_solver") == DPM_LEADING_25
    assert diffusion.inference_timesteps(25, "leading", solver="dpm_solver", steps_offset=1) == \
        [t + 1 for t in DPM_LEADING_25]
    assert diffusion.inference_timesteps(25, "leading") == list(range(960, -1, -40))  # DDIM's leading differs
    assert diffusion.inference_timesteps(4, "trailing", solver="dpm_solver") == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="spacing must be one of"):
        diffusion.inference_timesteps(25, "uniform")
    with pytest.raises(ValueError, match="need 1 <= steps <= 999"):
        diffusion.inference_timesteps(1000, "leading", solver="dpm_solver")


def test_default_sampling_uses_the_official_timesteps() -> None:
    model = shared(64)  # one block: the evaluated timesteps are the solver's
    seen: list[int] = []
    handle = model.t_embedder.register_forward_pre_hook(lambda _, args: seen.append(int(args[0].flatten()[0])))
    try:
        model.sample(torch.tensor([1]), cfg=1.0, steps=25, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert seen == OFFICIAL_25


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers(spacing: str, steps_offset: int) -> None:
    diffusers = pytest.importorskip("diffusers")
    diffusion = GaussianDiffusion()
    for steps in [*range(1, 60), 100, 250, 333, 500, 998]:
        config = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset).config
        ddim = diffusers.DDIMScheduler.from_config(config)
        ddim.set_timesteps(steps)
        assert diffusion.inference_timesteps(steps, spacing, solver="ddim", steps_offset=steps_offset) == \
            ddim.timesteps.tolist(), (spacing, steps)
        dpm = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
        dpm.set_timesteps(steps)
        assert diffusion.inference_timesteps(steps, spacing, solver="dpm_solver", steps_offset=steps_offset) == \
            dpm.timesteps.tolist(), (spacing, steps)
    official = diffusers.DPMSolverMultistepScheduler.from_config(diffusers.DDIMScheduler().config)
    official.set_timesteps(25)
    assert official.timesteps.tolist() == OFFICIAL_25


def test_dpm_solver_steps_match_diffusers() -> None:
    """The same ε function through diffusers' DPMSolverMultistepScheduler and through dpm_solver_pp_2m, for every
    spacing: equal to fp32 rounding of the scheduler's own arithmetic."""
    diffusers = pytest.importorskip("diffusers")
    diffusion = GaussianDiffusion()
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) / 2

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight) + 0.001 * t[:, None, None].float() * x

    noise = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
    for spacing in SPACINGS:
        scheduler = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing)
        scheduler.set_timesteps(10)
        x = noise.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(eps_fn(x, torch.full((2,), int(t))), t, x).prev_sample
        ours = diffusion.dpm_solver_pp_2m(eps_fn, noise, 10, spacing=spacing).sample
        torch.testing.assert_close(ours, x, atol=1e-5 * float(x.abs().max()), rtol=0)


def test_rejects_unknown_spacing() -> None:
    with pytest.raises(ValueError, match="spacing must be one of"):
        shared(16).sample(torch.tensor([0]), spacing="karras")


def test_rejects_unknown_sampler() -> None:
    with pytest.raises(ValueError, match="sampler must be one of"):
        shared(16).sample(torch.tensor([0]), sampler="euler")


def test_tiny_run_end_to_end(tiny_cfg, tmp_path) -> None:
    from arvision.pipeline import run as train
    cfg = tiny_cfg("tokenizer=vae", "generator=acdit", "generator.sample.steps=2")
    results = train(cfg, tmp_path / "run")
    gen = results["metrics"]["generator"]
    assert gen["test_loss"]["value"] < untrained_test_loss(cfg, results) - 0.03  # training lowered the held-out loss
    assert gen["sample_img_per_s"]["value"] > 0
    assert gen["nfe_per_image"] == 4 * 2 + 3  # 4 blocks × 2 steps + 3 clean passes
