"""FlowARGenerator: pyramid and AR inputs, block-causal backbone and its KV cache, flow heads, loss, sampling."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from arvision.generators.base import IncompatibleTokenizer
from arvision.generators.flowar import FlowARGenerator, GatedMLP, flowar_hidden, scale_positions, time_grid_for
from arvision.nn.attention import Attention
from arvision.nn.masks import flex_available, is_block_mask
from arvision.tokenizers.base import TokenSpec
from tests.conftest import untrained_test_loss

VAE = TokenSpec(name="vae", kind="continuous", layout="grid", grid=(8, 8), dim=4, image_size=32)
NUM_CLASSES = 10


def make(head: str = "spatial", *, seed: int = 0, **kwargs) -> FlowARGenerator:
    torch.manual_seed(seed)
    kwargs = {"dim": 32, "depth": 2, "heads": 2, "head_width": 32, "head_depth": 2, "head_heads": 2,
              "attention": "sdpa", **kwargs}
    model = FlowARGenerator(spec=VAE, num_classes=NUM_CLASSES, head=head, **kwargs)
    if head == "mlp":
        torch.nn.init.normal_(model.head.output.weight, std=0.3)  # MAR's zero-initialised output would hide the head
    return model.eval()


@functools.cache
def shared(head: str = "spatial", positions: str = "both", backbone: str = "official") -> FlowARGenerator:
    return make(head, positions=positions, backbone=backbone)


def batch(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=gen), torch.randint(0, NUM_CLASSES, (b,), generator=gen)


# --- construction -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    TokenSpec(name="vq", kind="discrete", layout="grid", grid=(8, 8), dim=8, vocab_size=32),
    TokenSpec(name="msvq", kind="discrete", layout="scales", grid=(8, 8), dim=8, vocab_size=32, scales=(1, 2, 4, 8)),
])
def test_rejects_discrete_tokenizers(spec: TokenSpec) -> None:
    with pytest.raises(IncompatibleTokenizer, match=r"^flowar needs a continuous tokenizer \(tokenizer=vae\); "
                                                    rf"got tokenizer={spec.name}$"):
        FlowARGenerator(spec=spec, num_classes=NUM_CLASSES)


def test_scales_default_and_validation() -> None:
    model = shared()
    assert model.scales == [1, 2, 4, 8] and model.seq_len == 85 and model.offsets == [0, 1, 5, 21, 85]
    assert make(scales=[1, 4, 8]).seq_len == 81
    for bad in ([1, 2, 4], [2, 4, 8], [1, 4, 2, 8]):
        with pytest.raises(ValueError, match="scale"):
            make(scales=bad)
    with pytest.raises(ValueError, match="head must be"):
        make(head="conv")
    for key in ("backbone", "mlp", "head_out_init"):
        with pytest.raises(ValueError, match=f"{key} must be one of"):
            make(**{key: "other"})


def test_official_build_two_stacks_biases_and_flowar_mlp_widths() -> None:
    """FlowAR's layout: encoder stack, norm, decoder_embed, decoder table and stack, decoder_norm, the head's table;
    attention with q/k/v and output biases; timm's SwiGLU (GELU gate, biases) int(8d/3) wide, in the head too."""
    model = shared()
    assert len(model.layers) == len(model.decoder_layers) == 2 and model.decoder_embed is not None
    assert model.pos_embed.shape == model.decoder_pos_embed.shape == model.head_pos_embed.shape == (1, 85, 32)
    block = model.layers[0]
    assert block.attention.wqkv.bias is not None and block.attention.wo.bias is not None
    assert isinstance(block.feed_forward, GatedMLP) and block.feed_forward.fc1_g.out_features == flowar_hidden(32)
    head_block = model.head.blocks[0]
    assert head_block.attn.qkv.bias is None and head_block.attn.proj.bias is not None  # FlowAR's head attention
    assert isinstance(head_block.mlp, GatedMLP) and head_block.mlp.fc1_x.out_features == 85
    assert [flowar_hidden(d) for d in (768, 1024, 1536)] == [2048, 2730, 4096]
    single = shared(backbone="single_stack")
    assert single.decoder_embed is None and single.decoder_pos_embed is None and len(single.decoder_layers) == 0
    assert len(single.new_caches()) == 2 and len(model.new_caches()) == 4
    earlier = make(mlp="swiglu", bias=False)
    assert earlier.layers[0].attention.wqkv.bias is None and earlier.head.blocks[0].mlp.w1.out_features == 128


def test_gated_mlp_is_timms_swiglu_with_a_gelu_gate() -> None:
    torch.manual_seed(0)
    mlp = GatedMLP(8, 12)
    for p in mlp.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 8)
    gate, value = x @ mlp.fc1_g.weight.T + mlp.fc1_g.bias, x @ mlp.fc1_x.weight.T + mlp.fc1_x.bias
    expected = (0.5 * gate * (1 + torch.erf(gate / 2**0.5)) * value) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), expected)


def test_initialisation_is_flowars_effective_one() -> None:
    """FlowAR's model-wide Xavier pass runs after the head's own init: every linear is Xavier with zero biases, the
    head's output and time MLP included; head_out_init=zero zeroes the output."""
    torch.manual_seed(0)
    model = FlowARGenerator(spec=VAE, num_classes=NUM_CLASSES, dim=32, depth=1, heads=2, head_width=64, head_heads=1)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.bias is None or not m.bias.any() for m in linears)
    for layer in (model.head.output, model.head.time_embed.mlp[0], model.decoder_embed):
        bound = (6 / (layer.in_features + layer.out_features)) ** 0.5
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.8 * bound
    torch.testing.assert_close(model.pos_embed.std(), torch.tensor(0.02), atol=2e-3, rtol=0)
    zero = FlowARGenerator(spec=VAE, num_classes=NUM_CLASSES, dim=32, depth=1, heads=2, head_width=64, head_heads=1,
                           head_out_init="zero")
    assert not zero.head.output.weight.any() and zero.head.final_ada.weight.any()


def test_rope_coordinates_are_normalised_to_the_finest_grid() -> None:
    pos = scale_positions([1, 2, 4], 4)
    assert pos[0].tolist() == [0, 0]
    assert pos[1:5].tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]  # index i of side 2 sits at 2·i
    assert pos[5:].tolist() == [[r, c] for r in range(4) for c in range(4)]


# --- pyramid and AR inputs ----------------------------------------------------------------------------------------------


def test_pyramid_is_area_downsampling_and_inputs_follow_flowar() -> None:
    model = shared()
    latents, labels = batch()
    pyr = model.pyramid(latents)
    assert [p.shape[-1] for p in pyr] == [1, 2, 4, 8] and pyr[-1] is latents
    torch.testing.assert_close(pyr[0][..., 0, 0], latents.mean(dim=(2, 3)))
    torch.testing.assert_close(pyr[2], F.avg_pool2d(latents, 2))
    # the next-scale input: bicubic to 8×8 then area down; from the 1×1 map it is that value everywhere
    nxt = model.next_input(pyr[0], 2)
    torch.testing.assert_close(nxt, pyr[0][..., 0, 0][:, None].expand(-1, 4, -1))
    up = F.interpolate(pyr[1], size=(8, 8), mode="bicubic")
    torch.testing.assert_close(model.next_input(pyr[1], 4), F.avg_pool2d(up, 2).flatten(2).transpose(1, 2))
    x = model.ar_inputs(pyr, model.cls_embedding(labels))
    assert x.shape == (3, 85, 32)
    torch.testing.assert_close(x[:, 0], model.cls_embedding.embedding_table.weight[labels])  # class slot


# --- the backbone ---------------------------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(pos=st.integers(1, 84))
def test_backbone_is_block_causal_over_scales(pos: int) -> None:
    """Changing the input of one slot changes the outputs of its own and later scales only."""
    model = shared()
    latents, labels = batch()
    with torch.no_grad():
        emb = model.cls_embedding(labels)
        x = model.ar_inputs(model.pyramid(latents), emb)
        base = model.backbone(x, emb, attn_mask=model.ar_mask)
        x2 = x.clone()
        x2[:, pos] += 1.0
        changed = (model.backbone(x2, emb, attn_mask=model.ar_mask) - base).abs().amax(dim=(0, 2)) > 1e-6
    scale = int(model.segments[pos])
    first = model.offsets[scale]
    assert not changed[:first].any() and changed[first:model.offsets[scale + 1]].all()


@pytest.mark.parametrize("positions,backbone", [("both", "official"), ("learned", "official"), ("rope", "official"),
                                               ("both", "single_stack")])
def test_cached_scale_by_scale_equals_one_block_causal_pass(positions: str, backbone: str) -> None:
    model = shared(positions=positions, backbone=backbone)
    latents, labels = batch()
    with torch.no_grad():
        full, _ = model(latents, labels)
        emb = model.cls_embedding(labels)
        x = model.ar_inputs(model.pyramid(latents), emb)
        caches = model.new_caches()
        pieces = [model.backbone(x[:, a:b], emb, start=a, caches=caches)
                  for a, b in zip(model.offsets[:-1], model.offsets[1:])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert all(cache.length == model.seq_len for cache in caches)


@pytest.mark.skipif(not flex_available(), reason="FlexAttention needs torch >= 2.5")
def test_flex_block_masks_equal_dense_masks() -> None:
    dense = make(attention="sdpa")
    flex = make(attention="flex")
    latents, labels = batch()
    with torch.no_grad():
        torch.manual_seed(1)
        a = dense.loss(latents, labels)["loss"]
        torch.manual_seed(1)
        b = flex.loss(latents, labels)["loss"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_dropout_is_unbiased_and_acts_in_training_only() -> None:
    """FlowAR drops attention probabilities (attn_drop 0.1): in training SDPA's dropout, whose mean over draws is the
    evaluation output (inverted dropout); in evaluation nothing is dropped."""
    torch.manual_seed(0)
    attention = Attention(16, 2, attn_dropout=0.3)
    plain = Attention(16, 2)
    plain.load_state_dict(attention.state_dict())
    x = torch.randn(1, 6, 16)
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    with torch.no_grad():
        reference = plain.eval()(x, attn_mask=mask)
        torch.testing.assert_close(attention.eval()(x, attn_mask=mask), reference)
        attention.train()
        draws = torch.stack([attention(x, attn_mask=mask) for _ in range(4000)])
    assert (draws[0] - reference).abs().max() > 1e-2  # something was dropped
    torch.testing.assert_close(draws.mean(0), reference, atol=0.03, rtol=0)


def test_attention_dropout_trains_the_backbone_on_the_dense_mask() -> None:
    """FlexAttention has no attention dropout: with it, training attends through SDPA's dense mask (as FlowAR does),
    the head and evaluation keep the block masks; a block mask with dropout in training is refused."""
    model = make(attention="flex", attn_dropout=0.1)
    backbone_mask, head_mask = model._masks(torch.device("cpu"))
    assert is_block_mask(backbone_mask) and is_block_mask(head_mask)  # make() returns it in eval mode
    backbone_mask, head_mask = model.train()._masks(torch.device("cpu"))
    assert torch.equal(backbone_mask, model.ar_mask) and is_block_mask(head_mask)
    flex_mask = model.eval()._masks(torch.device("cpu"))[0]
    with pytest.raises(ValueError, match="no attention dropout"):
        model.layers[0].attention.train()(torch.randn(1, model.seq_len, 32), attn_mask=flex_mask)


# --- the heads --------------------------------------------------------------------------------------------------------------


def test_spatial_and_cross_heads_attend_within_a_scale_only_and_mlp_head_per_token() -> None:
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 85, 4, generator=gen), torch.randn(2, 85, 32, generator=gen)
    t = torch.rand(2, 4, generator=gen)[:, shared().segments]
    for head in ("spatial", "cross", "mlp"):
        model = shared(head)
        with torch.no_grad():
            full = model.velocity(x, t, z, attn_mask=model.head_mask if head != "mlp" else None)
            for a, b in zip(model.offsets[:-1], model.offsets[1:]):  # one call per scale (as at sampling)
                part = model.velocity(x[:, a:b], t[:, a:b], z[:, a:b], start=a)
                torch.testing.assert_close(part, full[:, a:b], atol=1e-5, rtol=1e-5)
            x2 = x.clone()
            x2[:, 30] += 1.0  # a token of the 8×8 scale
            moved = (model.velocity(x2, t, z, attn_mask=model.head_mask if head != "mlp" else None)
                     - full).abs().amax(dim=(0, 2)) > 1e-6
            z2 = z.clone()
            z2[:, 30] += 1.0  # the condition of that token
            moved_z = (model.velocity(x, t, z2, attn_mask=model.head_mask if head != "mlp" else None)
                       - full).abs().amax(dim=(0, 2)) > 1e-6
        assert not moved[:21].any() and not moved_z[:21].any()
        expected = (moved[21:].sum() > 1) if head != "mlp" else (moved.nonzero().flatten().tolist() == [30])
        assert head == "mlp" or moved_z[21:].sum() > 1  # (MAR's zero adaLN: its conditions start unread)
        assert expected, moved.nonzero().flatten().tolist()


def test_head_embeds_floor_of_1000t() -> None:
    model = shared()
    x, z = torch.randn(1, 1, 4), torch.randn(1, 1, 32)
    with torch.no_grad():
        a = model.velocity(x, torch.tensor([[0.5001]]), z)
        b = model.velocity(x, torch.tensor([[0.5009]]), z)
        c = model.velocity(x, torch.tensor([[0.5011]]), z)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- the loss ---------------------------------------------------------------------------------------------------------------


def test_loss_is_flowar_weighted_with_one_t_per_image_and_scale(monkeypatch) -> None:
    model = make(head_batch_mul=2)
    latents, labels = batch()
    seen = {}
    original = model.velocity

    def spy(x_t, t, z, **kw):
        seen.update(t=t, z=z)
        return torch.zeros_like(x_t)  # v̂ = 0: the loss is then Σ_k mean((ε − x0)²)·n_k/n_K

    monkeypatch.setattr(model, "velocity", spy)
    torch.manual_seed(3)
    out = model.loss(latents, labels)
    monkeypatch.setattr(model, "velocity", original)
    t = seen["t"]
    assert t.shape == (6, 85) and seen["z"].shape == (6, 85, 32)  # batch repeated head_batch_mul times
    for a, b in zip(model.offsets[:-1], model.offsets[1:]):
        assert (t[:, a:b] == t[:, a:b.__index__()][:, :1]).all()  # shared within a scale
    assert len(set(t[:, model.offsets[:-1]].flatten().tolist())) == 24  # fresh per (row, scale)
    # replay the draws: t (rows·K uniforms), then the noise
    torch.manual_seed(3)
    torch.rand(6 * 4)
    x0 = torch.cat([p.flatten(2).transpose(1, 2) for p in model.pyramid(latents)], dim=1).repeat(2, 1, 1)
    noise = torch.randn_like(x0)
    expected = sum(((noise - x0)[:, a:b] ** 2).mean() * (b - a) / 64
                   for a, b in zip(model.offsets[:-1], model.offsets[1:]))
    torch.testing.assert_close(out["loss"], expected)
    assert set(out) == {"loss", "loss_scale0", "loss_scale1", "loss_scale2", "loss_scale3"}


def test_head_and_loss_run_in_fp32_under_autocast() -> None:
    model = make().train()
    latents, labels = batch()
    dtypes, backbone = [], []
    hooks = [model.head.output.register_forward_hook(lambda m, i, o: dtypes.append((i[0].dtype, o.dtype))),
             model.layers[0].feed_forward.fc2.register_forward_hook(lambda m, i, o: backbone.append(o.dtype))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(latents, labels)
    for hook in hooks:
        hook.remove()
    assert backbone == [torch.bfloat16]  # the backbone stays under autocast
    assert dtypes == [(torch.float32, torch.float32)] and out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("head", ["spatial", "cross", "mlp"])
def test_loss_decreases_when_overfitting(head: str) -> None:
    model = make(head, class_dropout=0.0).train()
    torch.nn.init.zeros_(model.head.output.weight)
    latents, labels = batch(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        torch.manual_seed(step % 4)  # a few fixed (t, noise) draws so the curve is not dominated by their variance
        loss = model.loss(latents, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) < 0.6 * sum(losses[:4]), losses


# --- sampling ------------------------------------------------------------------------------------------------------------------


def test_sampling_shape_seed_and_mode() -> None:
    model = make().train()  # sample switches to eval and back
    labels = torch.tensor([0, 3, 7])
    a = model.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(0), steps=4)
    b = model.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(0), steps=4)
    c = model.sample(labels, cfg=2.0, generator=torch.Generator().manual_seed(1), steps=4)
    assert a.shape == (3, 4, 8, 8) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c) and model.training


def test_unguided_interval_equals_cfg_one() -> None:
    """With guidance switched off by the interval, the doubled batch's conditional rows give the cfg = 1 sample:
    conditional rows come first and the null-class rows never leak into them."""
    model = shared()
    labels = torch.tensor([1, 2])
    plain = model.sample(labels, cfg=1.0, generator=torch.Generator().manual_seed(0), steps=4)
    off = model.sample(labels, cfg=4.0, generator=torch.Generator().manual_seed(0), steps=4, guidance_high=-1.0)
    on = model.sample(labels, cfg=4.0, generator=torch.Generator().manual_seed(0), steps=4)
    torch.testing.assert_close(off, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(on, plain)


def test_cfg_ramp_over_scales() -> None:
    model = shared()
    assert [model.scale_cfg(3.0, k, "linear") for k in range(4)] == pytest.approx([1.0, 5 / 3, 7 / 3, 3.0])
    assert [model.scale_cfg(3.0, k, "constant") for k in range(4)] == [3.0] * 4
    with pytest.raises(ValueError):
        model.scale_cfg(3.0, 0, "cosine")


def test_time_grids_follow_flowars_sampler() -> None:
    """time_grid=flowar: FlowAR's Euler grid (uniform at exactly 50 steps) for Euler and Heun, its SDE grid
    linspace(1, 0.04, steps) + 0 for Euler–Maruyama."""
    assert [time_grid_for(s, "flowar") for s in ("euler", "heun", "euler_maruyama")] == ["flowar", "flowar", "sde"]
    assert time_grid_for("euler_maruyama", "uniform") == "uniform"
    with pytest.raises(ValueError, match="flow sampler must be one of"):
        time_grid_for("rk4", "flowar")
    with pytest.raises(ValueError, match="time_grid must be one of"):
        shared().sample(torch.tensor([0]), time_grid="cosine")
    model = shared()
    assert model.sampling_cost(steps=25).head_passes == 4 * 24
    assert model.sampling_cost(steps=50).head_passes == 4 * 50  # the uniform grid: 51 points
    assert model.sampling_cost(steps=48).head_passes == 4 * 48
    assert model.sampling_cost(steps=25, sampler="euler_maruyama").head_passes == 4 * 25


def test_given_noise_is_the_noise_the_generator_would_draw() -> None:
    model = shared()
    labels = torch.tensor([1, 4])
    drawn = model.sample(labels, cfg=2.0, steps=4, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    noise = [torch.randn(2, s * s, 4, generator=gen) for s in model.scales]
    torch.testing.assert_close(model.sample(labels, cfg=2.0, steps=4, noise=noise), drawn, atol=0, rtol=0)
    steps = [[torch.randn(2, s * s, 4) for _ in range(4)] for s in model.scales]
    sde = [model.sample(labels, cfg=2.0, steps=4, noise=noise, step_noise=steps, sampler="euler_maruyama")
           for _ in range(2)]
    assert torch.equal(sde[0], sde[1]) and not torch.allclose(sde[0], drawn)


@pytest.mark.parametrize("sampler,grid,steps", [("euler", "flowar", 6), ("heun", "uniform", 3),
                                                ("euler_maruyama", "uniform", 3), ("euler_maruyama", "flowar", 3)])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_sampling_cost_counts_what_sampling_runs(sampler: str, grid: str, steps: int, cfg: float) -> None:
    model = shared("mlp")
    backbone_rows, head_rows = [], []
    hooks = [model.layers[0].register_forward_hook(lambda m, i, o: backbone_rows.append(i[0].shape[:2])),
             model.head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[:2]))]
    model.sample(torch.tensor([0, 1]), cfg=cfg, generator=torch.Generator().manual_seed(0), sampler=sampler,
                 time_grid=grid, steps=steps)
    for h in hooks:
        h.remove()
    kw = dict(sampler=sampler, time_grid=grid, steps=steps)
    cost = model.sampling_cost(cfg=cfg, **kw)
    assert cost.backbone_passes == len(backbone_rows) == 4 and cost.head_passes == len(head_rows)
    assert cost.passes == len(backbone_rows) + len(head_rows)
    rows = 2 * cost.rows_per_pass_factor
    assert [r for r, _ in backbone_rows] == [rows] * 4 and [n for _, n in backbone_rows] == [1, 4, 16, 64]
    # the linear ramp leaves the first scale unguided (weight 1), yet its head runs 2B rows too, as FlowAR's
    assert [r for r, _ in head_rows] == [rows] * len(head_rows)


def test_tiny_run_end_to_end(tiny_cfg, tmp_path) -> None:
    from arvision.pipeline import run as train
    cfg = tiny_cfg("tokenizer=vae", "generator=flowar")
    results = train(cfg, tmp_path / "run")
    gen = results["metrics"]["generator"]
    assert gen["test_loss"]["value"] < untrained_test_loss(cfg, results) - 0.03  # training lowered the held-out loss
    assert gen["sample_img_per_s"]["value"] > 0
    assert gen["nfe_per_image"] == 4 + 4 * 4  # 4 backbone passes + 4 scales × 4 Euler steps (flowar grid, steps=4)


def test_sampling_cost_is_a_function_of_the_settings_alone() -> None:
    model = make()
    assert model.sampling_cost(cfg=2.0).passes == 4 + 4 * 24  # sample's defaults: 25 steps on the flowar grid = 24
    heun = model.sampling_cost(cfg=2.0, steps=3, time_grid="uniform", sampler="heun")
    assert heun.passes == 4 + 4 * 5  # Heun on 3 intervals: 2·3 − 1
    model.sample(torch.tensor([0]), steps=3, time_grid="uniform", sampler="heun")
    assert model.sampling_cost(cfg=2.0).passes == 4 + 4 * 24  # an earlier sample call changes nothing
    assert model.sampling_cost(cfg=2.0, steps=2, sampler="euler", temperature=1.0).passes == 4 + 4 * 2
