"""Zero-shot in-/out-painting: the pixel → token rule, raster and next-scale `edit`, and `arvision-sample edit=…`."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from PIL import Image

from arvision import pipeline
from arvision.cli import sample as sample_cli
from arvision.cli.common import config_dir
from arvision.export import EditError, export
from arvision.generators.editing import (REGIONS, edit_images, editable_generators, known_on_grid, known_pixels,
                                         masked_preview, region)
from arvision.generators.next_scale import NextScaleGenerator
from arvision.generators.raster import RasterGenerator
from arvision.pipeline import run as train
from arvision.tokenizers.base import TokenSpec
from arvision.tokenizers.msvq import MultiScaleVQTokenizer
from arvision.tokenizers.vq import VQTokenizer
from tests.conftest import compose_train

NUM_CLASSES = 10
VQ = TokenSpec(name="vq", kind="discrete", layout="grid", grid=(4, 4), dim=8, vocab_size=32, image_size=16,
               image_channels=1)
RVQ = TokenSpec(name="rvq", kind="discrete", layout="depth", grid=(4, 4), dim=8, vocab_size=16, depth=2,
                image_size=16, image_channels=1)
NET = dict(image_size=16, image_channels=1, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
           code_dim=4)
IMAGE = 16  # pixel side of every tiny model here (a 4×4 token grid, 4 pixels per token)


# ------------------------------------------------------------------------------------------------ masks and the rule
def brute_force_known(known: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The documented rule, cell by cell: token (i, j) covers rows [⌊i·H/h⌋, ⌈(i+1)·H/h⌉) and the same for
    columns; it is known iff all of those pixels are."""
    big_h, big_w = known.shape
    out = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            rows = slice(i * big_h // h, math.ceil((i + 1) * big_h / h))
            cols = slice(j * big_w // w, math.ceil((j + 1) * big_w / w))
            out[i, j] = bool(known[rows, cols].all())
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), big_h=st.integers(1, 12), big_w=st.integers(1, 12), h=st.integers(1, 12),
       w=st.integers(1, 12), density=st.floats(0.5, 1.0))
def test_a_token_is_known_iff_its_whole_cell_is(data, big_h, big_w, h, w, density) -> None:
    seed = data.draw(st.integers(0, 2**31 - 1))
    known = torch.rand(big_h, big_w, generator=torch.Generator().manual_seed(seed)) < density
    grid = known_on_grid(known, (h, w))
    assert grid.dtype == torch.bool and grid.shape == (h, w)
    assert torch.equal(grid, brute_force_known(known, h, w))
    # batched = per row; one more known pixel never makes a token unknown (monotone)
    more = known.clone()
    more.view(-1)[data.draw(st.integers(0, big_h * big_w - 1))] = True
    both = known_on_grid(torch.stack([known, more]), (h, w))
    assert torch.equal(both[0], grid) and not (grid & ~both[1]).any()


def test_the_rule_is_the_identity_on_the_token_grid_and_exact_for_aligned_boxes() -> None:
    known = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(known_on_grid(known, 8), known)
    # 32 px, 8×8 tokens: the centre box (pixels 8..23) is exactly tokens 2..5; at VAR's 3×3 scale every cell
    # touches it, at 1×1 too; the kept border is exactly the complement on the aligned grid
    keep = known_pixels("inpaint", "center", 32, 32)
    expected = torch.ones(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = False
    assert torch.equal(known_on_grid(keep, 8), expected)
    assert not known_on_grid(keep, 3).any() and not known_on_grid(keep, 1).any()
    assert torch.equal(known_on_grid(known_pixels("outpaint", "center", 32, 32), 8), ~expected)
    with pytest.raises(TypeError, match="bool"):
        known_on_grid(keep.float(), 8)


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (32, 32)])
def test_regions_halves_are_complements_and_the_centre_is_the_middle_half(size) -> None:
    h, w = size
    masks = {name: region(name, h, w) for name in REGIONS}
    assert torch.equal(masks["left"], ~masks["right"]) and torch.equal(masks["top"], ~masks["bottom"])
    assert masks["left"][:, 0].all() and masks["top"][0].all() and masks["right"][:, -1].all()
    rows, cols = masks["center"].nonzero().unbind(1)
    assert rows.min() == h // 4 and rows.max() == h - h // 4 - 1
    assert cols.min() == w // 4 and cols.max() == w - w // 4 - 1
    assert masks["center"].sum() == (h - 2 * (h // 4)) * (w - 2 * (w // 4))
    for name in REGIONS:
        assert torch.equal(known_pixels("inpaint", name, h, w), ~known_pixels("outpaint", name, h, w))
    with pytest.raises(ValueError, match="edit_mask must be one of"):
        region("middle", h, w)
    with pytest.raises(ValueError, match="edit must be one of"):
        known_pixels("erase", "left", h, w)


def row_masks(b: int = 3) -> torch.Tensor:
    """One pixel mask per row (B, 16, 16): different edits in one batch (inpaint centre, keep left, keep top)."""
    masks = [known_pixels("inpaint", "center", IMAGE, IMAGE), known_pixels("outpaint", "left", IMAGE, IMAGE),
             known_pixels("outpaint", "top", IMAGE, IMAGE)]
    return torch.stack([masks[i % 3] for i in range(b)])


def labels_for(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (b,), generator=torch.Generator().manual_seed(seed + 1))


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ raster
RASTER_MODES = {"vq": (VQ, "flatten"), "rvq_flat": (RVQ, "flatten"), "rvq_head": (RVQ, "head")}


@functools.cache
def raster(mode: str) -> RasterGenerator:
    spec, depth_mode = RASTER_MODES[mode]
    torch.manual_seed(0)
    # own code embeddings: no tokenizer is attached here (the RQ default reads the tokenizer's code vectors)
    model = RasterGenerator(spec=spec, num_classes=NUM_CLASSES, dim=32, depth=2, heads=4, depth_mode=depth_mode,
                            code_embeddings="learned")
    head = model.depth_head.output if model.depth_mode == "head" else model.output
    torch.nn.init.normal_(head.weight, std=0.5)  # the zero-initialised head would make every logit equal
    return model.eval()


def raster_truth(model: RasterGenerator, b: int = 3, seed: int = 0) -> torch.Tensor:
    shape = (b, *model.spec.grid) + ((model.levels,) if model.spec.layout == "depth" else ())
    return torch.randint(0, model.spec.vocab_size, shape, generator=rng(seed))


def per_code(known: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A token-grid mask (B, h, w) broadcast over the depth codes of `tokens` when it has them."""
    return known[..., None].expand_as(tokens) if tokens.dim() == 4 else known


def teacher_forced_greedy(model: RasterGenerator, tokens: torch.Tensor, labels: torch.Tensor,
                          cfg: float) -> torch.Tensor:
    """argmax of the (guided) teacher-forced logits of `tokens`, shaped as the tokens."""
    with torch.no_grad():
        logits = model(tokens, labels)
        if cfg != 1.0:
            logits = logits + (cfg - 1.0) * (logits - model(tokens, torch.full_like(labels, NUM_CLASSES)))
    return model.unflatten(logits.argmax(-1))


@pytest.mark.parametrize("mode", list(RASTER_MODES))
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_raster_edit_forces_known_tokens_and_feeds_them_back(mode: str, cfg: float) -> None:
    """Known tokens are the reference's; every token is the greedy choice given the *edited* prefix — so the
    forced tokens, not the drawn ones, went into the cache (a skipped run of known tokens is fed in one pass)."""
    model = raster(mode)
    truth, labels = raster_truth(model), labels_for()
    known = known_on_grid(row_masks(), model.spec.grid)
    edited = model.edit(labels, truth, row_masks(), cfg=cfg, temperature=0.0)
    assert edited.shape == truth.shape
    forced = per_code(known, truth)
    assert torch.equal(edited[forced], truth[forced])
    assert (edited != truth)[~forced].any()  # the untrained model does not guess the hidden tokens
    greedy = teacher_forced_greedy(model, edited, labels, cfg)
    assert torch.equal(edited[~forced], greedy[~forced])


@pytest.mark.parametrize("mode", list(RASTER_MODES))
def test_raster_edit_with_a_token_grid_mask_and_random_sampling(mode: str) -> None:
    model = raster(mode)
    truth, labels = raster_truth(model, b=4, seed=1), labels_for(4)
    known = torch.rand(4, *model.spec.grid, generator=rng(5)) < 0.5
    edited = model.edit(labels, truth, known, cfg=2.0, generator=rng(2), temperature=1.0, top_k=8, top_p=0.9)
    forced = per_code(known, truth)
    assert torch.equal(edited[forced], truth[forced]) and (edited != truth)[~forced].any()
    again = model.edit(labels, truth, known, cfg=2.0, generator=rng(2), temperature=1.0, top_k=8, top_p=0.9)
    assert torch.equal(again, edited)  # seeded


@pytest.mark.parametrize("mode", list(RASTER_MODES))
def test_raster_fully_known_mask_returns_the_reference_without_a_pass(mode: str, monkeypatch) -> None:
    model = raster(mode)
    truth, labels = raster_truth(model), labels_for()
    monkeypatch.setattr(model, "decode", lambda *a, **k: pytest.fail("a network pass for a fully known image"))
    edited = model.edit(labels, truth, torch.ones(IMAGE, IMAGE, dtype=torch.bool), cfg=2.0, generator=rng())
    assert torch.equal(edited, truth)


@pytest.mark.parametrize("mode", list(RASTER_MODES))
@pytest.mark.parametrize("cfg,cfg_interval", [(1.0, -1), (2.5, -1), (2.5, 5)])
def test_raster_empty_mask_is_sample_with_the_same_seed(mode: str, cfg: float, cfg_interval: int) -> None:
    model = raster(mode)
    truth, labels = raster_truth(model), labels_for()
    options = dict(cfg=cfg, cfg_interval=cfg_interval, temperature=0.9, top_k=10, top_p=0.95)
    sampled = model.sample(labels, generator=rng(7), **options)
    edited = model.edit(labels, truth, torch.zeros(3, IMAGE, IMAGE, dtype=torch.bool), generator=rng(7), **options)
    assert torch.equal(edited, sampled)


def test_raster_edit_checks_the_reference_tokens() -> None:
    model = raster("rvq_flat")
    with pytest.raises(ValueError, match=r"known_tokens must have shape \(3, 4, 4, 2\)"):
        model.edit(labels_for(), torch.zeros(3, 4, 4, dtype=torch.long), row_masks())
    with pytest.raises(ValueError, match="known mask"):
        model.edit(labels_for(), raster_truth(model), row_masks(2))


# ------------------------------------------------------------------------------------------------ next-scale
@functools.cache
def tokenizer(residual: bool):
    torch.manual_seed(0)
    tok = MultiScaleVQTokenizer(**NET, scales=(1, 2, 3, 4)) if residual else VQTokenizer(**NET)
    torch.nn.init.normal_(tok.quantize.embedding.weight)  # distinct codes, so the inputs carry information
    return tok.eval()


@functools.cache
def next_scale(residual: bool) -> NextScaleGenerator:
    tok = tokenizer(residual)
    torch.manual_seed(0)
    model = NextScaleGenerator(spec=tok.spec, num_classes=NUM_CLASSES, depth=2, dim=32, heads=2, residual=residual,
                               cond_drop_rate=0.0).attach_tokenizer(tok)
    with torch.no_grad():  # VAR's init makes every block and the head near-silent: wake them up
        for block in model.blocks:
            block.ada_lin[-1].weight.normal_(std=0.3)
        model.head.weight.normal_(std=0.5)
    return model.eval()


def reference(model: NextScaleGenerator, b: int = 3, seed: int = 0):
    """Tokens of real (random) images, as `tokenizer.encode` gives them."""
    images = torch.rand(b, 1, IMAGE, IMAGE, generator=rng(seed)) * 2 - 1
    with torch.no_grad():
        return model.tokenizer_on("cpu").encode(images)


class FedMaps:
    """The token map of every scale that is fed forward, read off the inputs (VAR: the accumulator's `idx`;
    FlexVAR: the code map handed to `flex_input`), plus the returned last scale."""

    def __init__(self, model: NextScaleGenerator, monkeypatch) -> None:
        self.maps: list[torch.Tensor] = []
        tok = model.tokenizer_on("cpu")
        if model.residual:
            original = tok.next_scale_input

            def spy(k, f_hat, idx):
                self.maps.append(idx.reshape(idx.shape[0], model.scales[k], model.scales[k]).clone())
                return original(k, f_hat, idx)

            monkeypatch.setattr(tok, "next_scale_input", spy)
        else:
            codebook = tok.quantize.codebook()
            original_input = model.flex_input

            def flex_spy(code, n):
                flat = code.permute(0, 2, 3, 1)  # (B, n, n, C): recover the indices (the codes are distinct)
                self.maps.append((flat[..., None, :] - codebook).abs().sum(-1).argmin(-1))
                return original_input(code, n)

            monkeypatch.setattr(model, "flex_input", flex_spy)


def scale_truth(model: NextScaleGenerator, tokens, schedule) -> list[torch.Tensor]:
    return list(tokens) if model.residual else model.quantized_scales(tokens, schedule)[0]


def teacher_forced_scale_greedy(model: NextScaleGenerator, maps, labels, schedule, cfg: float) -> list[torch.Tensor]:
    """argmax per scale of the (guided) teacher-forced logits built from the given per-scale maps."""
    with torch.no_grad():
        if model.residual:
            inputs = model.tokenizer_on("cpu").teacher_forcing_inputs(maps)
        else:
            codebook = model.tokenizer_on("cpu").quantize.codebook()
            inputs = torch.cat([model.flex_input(codebook[m].permute(0, 3, 1, 2), n)
                                for m, n in zip(maps[:-1], schedule[1:])], dim=1)
        cond = model.logits(inputs, labels, schedule)
        uncond = model.logits(inputs, torch.full_like(labels, NUM_CLASSES), schedule)
    out, start = [], 0
    for k, n in enumerate(schedule):
        t = model.guidance(cfg, k, tuple(schedule), "linear") if cfg != 1.0 else 0.0
        logits = (1 + t) * cond[:, start:start + n * n] - t * uncond[:, start:start + n * n]
        out.append(logits.argmax(-1).view(-1, n, n))
        start += n * n
    return out


@pytest.mark.parametrize("residual", [True, False], ids=["var_msvq", "flexvar_vq"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_next_scale_edit_forces_known_tokens_at_every_scale(residual: bool, cfg: float, monkeypatch) -> None:
    """VAR's zero-shot rule: at every scale the known cells carry the reference's tokens, and those (not the
    drawn ones) are what the next scale is built from: each scale is the greedy choice given the edited coarser
    scales."""
    model = next_scale(residual)
    truth, labels, pixels = reference(model), labels_for(), row_masks()
    schedule = model.scales
    fed = FedMaps(model, monkeypatch)
    out = model.edit(labels, truth, pixels, cfg=cfg, temperature=0.0)
    maps = fed.maps + [out[-1] if residual else out]
    if residual:
        assert len(out) == len(schedule) and all(torch.equal(a, b) for a, b in zip(out, maps))
    gt = scale_truth(model, truth, schedule)
    some_known = False
    for k, n in enumerate(schedule):
        known = known_on_grid(pixels, n)
        assert maps[k].shape == (3, n, n) and torch.equal(maps[k][known], gt[k][known]), f"scale {k}"
        some_known |= bool(known.any())
    assert some_known and any((m != g)[~known_on_grid(pixels, m.shape[-1])].any() for m, g in zip(maps, gt))
    greedy = teacher_forced_scale_greedy(model, maps, labels, schedule, cfg)
    for k, n in enumerate(schedule):
        unknown = ~known_on_grid(pixels, n)
        assert torch.equal(maps[k][unknown], greedy[k][unknown]), f"scale {k}"


def test_flexvar_edit_on_another_schedule(monkeypatch) -> None:
    model = next_scale(False)
    truth, labels, pixels = reference(model, seed=2), labels_for(), row_masks()
    fed = FedMaps(model, monkeypatch)
    out = model.edit(labels, truth, pixels, cfg=2.0, generator=rng(1), schedule=(1, 2, 4))
    maps = fed.maps + [out]
    assert [m.shape[-1] for m in maps] == [1, 2, 4]
    for m, g, n in zip(maps, scale_truth(model, truth, (1, 2, 4)), (1, 2, 4)):
        known = known_on_grid(pixels, n)
        assert torch.equal(m[known], g[known])


@pytest.mark.parametrize("residual", [True, False], ids=["var_msvq", "flexvar_vq"])
def test_next_scale_fully_known_mask_reproduces_the_reference(residual: bool) -> None:
    model = next_scale(residual)
    truth = reference(model)
    out = model.edit(labels_for(), truth, torch.ones(IMAGE, IMAGE, dtype=torch.bool), cfg=2.0, generator=rng())
    if residual:
        assert all(torch.equal(a, b) for a, b in zip(out, truth))
    else:
        assert torch.equal(out, truth)


@pytest.mark.parametrize("residual", [True, False], ids=["var_msvq", "flexvar_vq"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_next_scale_empty_mask_is_sample_with_the_same_seed(residual: bool, cfg: float) -> None:
    model = next_scale(residual)
    labels = labels_for()
    options = dict(cfg=cfg, temperature=0.9, top_k=12, top_p=0.95)
    sampled = model.sample(labels, generator=rng(4), **options)
    edited = model.edit(labels, reference(model), torch.zeros(IMAGE, IMAGE, dtype=torch.bool), generator=rng(4),
                        **options)
    if residual:
        assert all(torch.equal(a, b) for a, b in zip(edited, sampled))
    else:
        assert torch.equal(edited, sampled)


def test_next_scale_edit_checks_the_reference_tokens() -> None:
    var, flex = next_scale(True), next_scale(False)
    with pytest.raises(ValueError, match="known_tokens must be 4 maps"):
        var.edit(labels_for(), reference(var)[:-1], row_masks())
    with pytest.raises(ValueError, match=r"known_tokens must be the grid \(B=3, 4, 4\)"):
        flex.edit(labels_for(), reference(var)[-1][:2], row_masks())


def test_edit_images_keeps_the_known_tokens_of_real_images(monkeypatch) -> None:
    """The CLI's path: encode → edit → decode; re-encoding is not needed to check it, the tokens are: those handed
    to decode carry the images' own tokens on every known cell of every scale."""
    model = next_scale(True)
    tok = model.tokenizer_on("cpu")
    images = torch.rand(5, 1, IMAGE, IMAGE, generator=rng(3)) * 2 - 1
    known = known_pixels("inpaint", "right", IMAGE, IMAGE)
    decoded: list[list[torch.Tensor]] = []
    plain_decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda tokens: decoded.append(tokens) or plain_decode(tokens))
    edited, seconds = edit_images(model, tok, images, labels_for(5), known, batch_size=2, seed=0, cfg=1.5)
    assert edited.shape == images.shape and seconds > 0 and edited.abs().max() <= 1
    assert len(decoded) == 3  # chunks of 2, 2 and 1
    with torch.no_grad():
        truth = tok.encode(images)
    fed = [torch.cat([chunk[k] for chunk in decoded]) for k in range(len(model.scales))]
    for k, n in enumerate(model.scales):
        cells = known_on_grid(known, n).expand(5, n, n)
        assert torch.equal(fed[k][cells], truth[k][cells]), f"scale {k}"
    finest = known_on_grid(known, model.scales[-1]).expand_as(truth[-1])
    assert finest.any() and (fed[-1] != truth[-1])[~finest].any()  # the hidden half is generated
    torch.testing.assert_close(edited, torch.cat([plain_decode(chunk).clamp(-1, 1) for chunk in decoded]))
    again, _ = edit_images(model, model.tokenizer_on("cpu"), images, labels_for(5), known, batch_size=2, seed=0,
                           cfg=1.5)
    assert torch.equal(edited, again)
    preview = masked_preview(images, known.expand(5, IMAGE, IMAGE))
    assert torch.equal(preview[..., :8], images[..., :8]) and (preview[..., 8:] == 0).all()


# ------------------------------------------------------------------------------------------------ arvision-sample
RUNS = {"raster": [], "var": ["tokenizer=msvq", "generator=next_scale"],
        "flexvar": ["generator=next_scale", "generator.residual=false"], "flowar": ["paradigm=flowar"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny trained run per generator kind (tokenizers shared through the artifact cache)."""
    root = tmp_path_factory.mktemp("edit_runs")
    out = {}
    for name, overrides in RUNS.items():
        cfg = compose_train(["debug=tiny", "data=shapes", "logger=csv", "evaluate=false", *overrides], root)
        train(cfg, root / name)
        out[name] = root / name
    return out


def sample_cfg(run: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=[f"run={run}", *overrides])
    with open_dict(cfg):
        cfg.paths.root_dir = str(run.parent)
    return cfg


@pytest.mark.parametrize("kind,edit,mask,generated", [("raster", "inpaint", "center", 0.25),
                                                      ("var", "outpaint", "center", 0.75),
                                                      ("flexvar", "inpaint", "left", 0.5)])
def test_cli_writes_the_edited_npz_and_the_grid(runs, kind, edit, mask, generated) -> None:
    cfg = sample_cfg(runs[kind], f"edit={edit}", f"edit_mask={mask}", "num_samples=18", "batch_size=7")
    exported = export(cfg)
    out = exported.path
    assert out == runs[kind] / f"edit_{edit}_{mask}_18.npz"
    npz = np.load(out)
    assert npz["images"].shape == (18, 32, 32, 1) and npz["images"].dtype == np.uint8
    assert npz["originals"].shape == (18, 32, 32, 1) and npz["masks"].shape == (18, 32, 32)
    assert npz["masks"].dtype == bool and npz["masks"].mean() == pytest.approx(generated)
    assert torch.equal(torch.from_numpy(npz["masks"][0]), ~known_pixels(edit, mask, 32, 32))
    dm = pipeline.build_datamodule(compose_train(["debug=tiny", "data=shapes"], runs[kind].parent))
    originals, labels = dm.reference_images(18)
    assert np.array_equal(npz["labels"], labels.numpy())
    assert np.array_equal(npz["originals"], originals.permute(0, 2, 3, 1).numpy())
    # rows original / masked / edited for 16 columns, then a second block for the last 2 (padded to 16)
    width, height = Image.open(out.with_suffix(".png")).size
    assert (width, height) == (16 * 34 + 2, 6 * 34 + 2)
    assert f"edit={edit} edit_mask={mask}" in exported.message
    again = np.load(export(cfg).path)
    assert np.array_equal(again["images"], npz["images"])  # seeded


def test_cli_names_the_generators_that_can_edit(runs, capsys) -> None:
    with pytest.raises(EditError) as err:
        export(sample_cfg(runs["flowar"], "edit=inpaint", "num_samples=4"))
    message = str(err.value)
    assert "\n" not in message and "flowar" in message
    assert all(name in message for name in editable_generators()) and editable_generators() == ["next_scale", "raster"]
    with pytest.raises(SystemExit):
        sample_cli.main.__wrapped__(sample_cfg(runs["flowar"], "edit=inpaint", "num_samples=4"))
    assert capsys.readouterr().err.count("arvision: error:") == 1
    for bad, match in [("edit=erase", "edit must be"), ("edit_mask=middle", "edit_mask must be"),
                       ("num_samples=100000", "test images")]:
        with pytest.raises(EditError, match=match):
            export(sample_cfg(runs["raster"], "edit=inpaint", bad))
