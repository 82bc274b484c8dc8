"""FlexVAR's official files (arvision.imports.flexvar): parity with the official code from the golden fixture,
arvision-import → arvision-sample → arvision-eval end to end, the export round trip, wrong files named in one line,
and every layout FlexVAR's files use."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import arvision.generators.next_scale as next_scale
from arvision import pipeline
from arvision.cli import evaluate as evaluate_cli
from arvision.cli import sample as sample_cli
from arvision.generators.sampling import top_k_filter, top_p_filter_var
from arvision.imports.base import CheckpointMismatch, read_official
from arvision.imports.runs import export_official, import_official
from arvision.nn.masks import segment_ids
from arvision.utils.instantiate import instantiate
from tests.conftest import REPO, compose_config, compose_import, run_import_cli

FIXTURE = REPO / "tests" / "fixtures" / "parity" / "flexvar.pt"
PRESET = "flexvar_d16"
NAMES = ("FlexVAE.pth", "FlexVARd16-epo179.pth")
# depth, generator parameters (M) of the official builder, released file
PRESETS = {"flexvar_d16": (16, 315.6, "FlexVARd16-epo179.pth"), "flexvar_d20": (20, 607.5, "FlexVARd20-epo249.pth"),
           "flexvar_d24": (24, 1041.3, "FlexVARd24-epo349.pth")}
# The fixture's tiny models (the official classes, narrowed) on 32-px, 3-channel shapes of its 10 classes.
DATA = ["data=shapes", "data.image_size=32", "data.channels=3", "data.num_classes=10"]


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)



def flexvar_mask(schedule) -> torch.Tensor:
    """FlexVAR's `attn_bias_for_masking` for `schedule`: (1, 1, L, L), 0 where a token may attend, −inf elsewhere."""
    scale = segment_ids([n * n for n in schedule], device="cpu")
    return torch.where(scale[:, None] >= scale[None, :], 0.0, float("-inf"))[None, None]


def official_states(fx: dict) -> tuple[dict, dict]:
    """The fixture's state dicts as FlexVAR's modules hold them: fp32, the generator's mask buffer in its place
    (after `pos_1LC`, as FlexVAR registers it)."""
    tokenizer = {k: v.float() for k, v in fx["state"]["tokenizer"].items()}
    generator = {}
    for name, tensor in fx["state"]["generator"].items():
        generator[name] = tensor.float() if tensor.is_floating_point() else tensor
        if name == "pos_1LC":
            generator["attn_bias_for_masking"] = flexvar_mask(fx["settings"]["default"])
    return tokenizer, generator


def write(tmp_path: Path, tokenizer: object, generator: object, names=NAMES) -> tuple[Path, Path]:
    tok, gen = tmp_path / names[0], tmp_path / names[1]
    torch.save(tokenizer, tok)
    torch.save(generator, gen)
    return tok, gen


def released(tmp_path: Path, fx: dict) -> tuple[Path, Path]:
    tok_state, gen_state = official_states(fx)
    return write(tmp_path, {"model": tok_state}, gen_state)


def do_import(tmp_path: Path, fx: dict, files: tuple[Path, Path], *extra: str, run: str = "run"
              ) -> pipeline.FinishedRun:
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={files[0]}", f"generator_file={files[1]}",
                          *fx["overrides"], *extra], tmp_path)
    import_official(cfg, tmp_path / run)
    return pipeline.load_run(tmp_path / run)


def training_checkpoint(vae: dict, var: dict) -> dict:
    """FlexVAR's `ar-ckpt-epo*.pth` (train.py / trainer.py): both models under `trainer`, beside the optimiser and
    the trainer's config, with the pickled args."""
    return {"epoch": 179, "iter": 0, "trainer": {"config": {"patch_nums": [1, 2, 3, 4]}, "var_wo_ddp": var,
                                                 "vae_local": vae, "var_opt": {"param_groups": []}},
            "args": argparse.Namespace(depth=16, pn="1_2_3_4_5_6_8_10_13_16")}


class Draws:
    """Every draw of arvision's sampler: its top-k and the indices drawn."""

    def __init__(self, monkeypatch) -> None:
        self.top_ks, self.indices, original = [], [], next_scale.sample_from_logits

        def recording(logits, **kwargs):
            out = original(logits, **kwargs)
            self.top_ks.append(kwargs["top_k"])
            self.indices.append(out)
            return out

        monkeypatch.setattr(next_scale, "sample_from_logits", recording)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens of every scale (B, L), top-k of each draw) since the last call."""
        out = torch.cat(self.indices, dim=1), torch.tensor(self.top_ks)
        self.top_ks.clear()
        self.indices.clear()
        return out


class HeadCalls:
    def __init__(self, generator: torch.nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = generator.head.register_forward_hook(lambda mod, inp, out: self.outputs.append(out.float()))

    def __enter__(self) -> HeadCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# --------------------------------------------------------------------------------------------- (a) golden fixture
def test_golden_fixture_outputs_equal_the_official_code(tmp_path, fixture, monkeypatch):
    """The fixture holds official-layout state dicts (the official FlexVAE and FlexVAR classes, seeded random
    weights), inputs and the official code's outputs (experiments/parity/flexvar.py --fixture at `official_commit`);
    the import reproduces every one of them: tokens, per-scale ground truth from the continuous latent, logits,
    and FlexVAR's sampler (its CFG ramp, greedy draws off the default schedule, the 512-px schedule)."""
    fx = fixture
    official, inputs, s, tol = fx["official"], fx["inputs"], fx["settings"], fx["tolerance"]
    run = do_import(tmp_path, fx, released(tmp_path, fx))
    tokenizer, generator = run.tokenizer, run.generator
    images, labels, sample_labels = inputs["images"], inputs["labels"], inputs["sample_labels"]
    schedule = tuple(inputs["training_schedule"].tolist())
    default, zero_shot, at_512 = tuple(s["default"]), tuple(s["zero_shot"]), tuple(s["at_512"])
    assert schedule[-1] < 16 and generator.scales == default  # a training schedule that ends below the grid
    cfg, seed = 1 + s["flexvar_cfg"], s["seed"]
    draws = Draws(monkeypatch)
    ours = {}
    with torch.no_grad():
        ours["tokenizer indices"] = tokenizer.encode(images)
        ours["decoded images (indices)"] = tokenizer.decode_codes(
            tokenizer.quantize.lookup(official["tokenizer indices"]))
        per_side = generator.encode(images)
        inputs_tf, targets = generator.teacher_forcing(per_side, schedule)
        ours["per-scale targets (training schedule)"] = targets
        ours["teacher-forcing inputs (training schedule)"] = inputs_tf
        rows = torch.cat([labels, torch.tensor([generator.num_classes])])
        cycled = [m.repeat(-(-rows.shape[0] // m.shape[0]), 1, 1)[:rows.shape[0]] for m in per_side]
        ours["teacher-forced logits (training schedule)"] = generator(cycled, rows, schedule=schedule)
        ours["teacher-forced logits (10 steps)"] = generator(cycled, rows)
        logits = inputs["guided_logits"]
        ours["top-k/top-p kept sets"] = torch.stack([top_p_filter_var(top_k_filter(logits, k), p).isfinite()
                                                     for k, p in s["kept"]])
    with HeadCalls(generator) as calls:
        grid = generator.sample(sample_labels, cfg=cfg, temperature=0.0)
    ours["greedy tokens, cfg (10 steps)"], _ = draws.take()
    ours["greedy decoded image (10 steps)"] = tokenizer.decode(grid)
    ours["cached-pass logits (greedy run, 10 steps)"] = torch.cat(calls.outputs, dim=1)
    generator.sample(sample_labels, cfg=cfg, temperature=0.0, schedule=zero_shot)
    ours["greedy tokens, cfg (13 steps)"], _ = draws.take()
    for name, steps in (("10 steps", default), ("13 steps", zero_shot)):
        generator.sample(sample_labels, cfg=cfg, top_k=s["top_k"], top_p=s["top_p"], schedule=steps,
                         generator=torch.Generator().manual_seed(seed))
        ours[f"sampled tokens, cfg top-k top-p ({name})"], ours[f"top-k of each draw ({name})"] = draws.take()
    grid = generator.sample(sample_labels, cfg=1 + s["flexvar_cfg_512"], top_k=s["top_k"], top_p=s["top_p"],
                            schedule=at_512, generator=torch.Generator().manual_seed(seed))
    ours["sampled tokens (512-px schedule)"], _ = draws.take()
    ours["decoded image (512-px schedule)"] = tokenizer.decode(grid)
    assert grid.shape == (1, 32, 32) and ours["decoded image (512-px schedule)"].shape == (1, 3, 64, 64)

    assert set(ours) == set(official)  # every recorded official output is checked
    for name, theirs in official.items():
        mine = ours[name].reshape(theirs.shape)
        if theirs.is_floating_point():
            assert (mine - theirs).abs().max().item() <= tol[name], name
        else:
            assert torch.equal(mine.to(theirs.dtype), theirs), name
    # FlexVAR's greedy rule draws sides 7, 9, 12, 14 of the 13-step schedule with top-k 1
    assert official["top-k of each draw (13 steps)"].tolist() == [
        1 if n in (7, 9, 12, 14) else s["top_k"] for n in zero_shot]
    # the fixture fails arvision's earlier sampler, and FlexVAR's cfg read as arvision's (one off)
    for wrong in ({"greedy_off_grid": False}, {"cfg_schedule": "linear_to_last"}, {"cfg": s["flexvar_cfg"]}):
        generator.sample(sample_labels, **{"cfg": cfg, **wrong}, top_k=s["top_k"], top_p=s["top_p"],
                         schedule=zero_shot, generator=torch.Generator().manual_seed(seed))
        assert not torch.equal(draws.take()[0], official["sampled tokens, cfg top-k top-p (13 steps)"]), wrong


# --------------------------------------------------------------------------------------------- (b) end to end
def test_import_cli_then_sample_and_eval_the_imported_run(tmp_path, fixture, capsys):
    tok, gen = released(tmp_path, fixture)
    run = tmp_path / "imported"
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={tok}",
                          f"generator_file={gen}", *fixture["overrides"], *DATA, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    assert f"imported official={PRESET}" in done.stdout and f"arvision-sample run={run}" in done.stdout
    record = json.loads((run / "results.json").read_text())
    imported = record["imported"]
    assert imported["family"] == "flexvar" and imported["preset"] == PRESET
    assert (imported["files"]["tokenizer"]["layout"], imported["files"]["generator"]["layout"]) == ("model", "")
    assert (imported["published"]["fid"], imported["published"]["is"]) == (3.05, 291.3)
    assert "cfg=3.5" in imported["convention"] and "cfg 1 = unguided" in imported["convention"]
    sample = record["config"]["generator"]["sample"]  # the README's evaluation, in arvision's convention
    assert {k: sample[k] for k in ("cfg", "temperature", "top_k", "top_p", "cfg_schedule", "schedule",
                                   "greedy_off_grid")} == {
        "cfg": 3.5, "temperature": 1.0, "top_k": 900, "top_p": 0.95, "cfg_schedule": "linear", "schedule": None,
        "greedy_off_grid": True}

    out = tmp_path / "samples.npz"
    sample_cli.main.__wrapped__(compose_config("sample", [f"run={run}", "num_samples=10", "batch_size=5",
                                                          f"out={out}"], tmp_path))
    assert capsys.readouterr().out.startswith(f"wrote {out}: 10 samples")
    npz = np.load(out)
    assert npz["arr_0"].shape == (10, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    assert np.bincount(npz["labels"], minlength=10).tolist() == [1] * 10

    evaluate_cli.main.__wrapped__(compose_config("eval", [
        f"run={run}", "metrics.num_samples=10", "metrics.num_reference=40", "metrics.batch_size=10",
        "metrics.latency_batch_size=null", "metrics.classifier.epochs=0.1", "select=[fid,accuracy,sampling]",
        "+sample.schedule=[1,2,3,4,5,6,7,8,9,10,12,14,16]"], tmp_path))
    evaluation = json.loads((run / "results.json").read_text())["evaluations"][-1]
    assert np.isfinite(evaluation["metrics"]["fid"]["value"]) and evaluation["metrics"]["fid"]["num_samples"] == 10
    assert 0.0 <= evaluation["metrics"]["accuracy"]["value"] <= 1.0
    assert evaluation["metrics"]["nfe_per_image"] == 13  # the zero-shot schedule's steps

    # the 512-px schedule: a 32×32 grid decoded to twice the trained resolution
    big = tmp_path / "big.npz"
    sample_cli.main.__wrapped__(compose_config("sample", [
        f"run={run}", "num_samples=2", "batch_size=2", f"out={big}",
        "+sample.schedule=[1,2,3,4,5,6,7,8,9,10,12,14,16,23,32]", "+sample.cfg=4.0"], tmp_path))
    assert np.load(big)["arr_0"].shape == (2, 64, 64, 3)


# --------------------------------------------------------------------------------------------- (c) round trip
@pytest.mark.parametrize("layout", ["released", "training"])
def test_export_writes_the_official_files_back(layout, tmp_path, fixture):
    tok_state, gen_state = official_states(fixture)
    if layout == "released":
        expected = ({"model": tok_state}, gen_state)
        files = write(tmp_path, *expected)
    else:  # both from one training checkpoint; each export file keeps its model's nesting, without the rest
        files = (tmp_path / "ar-ckpt-epo179.pth",) * 2
        torch.save(training_checkpoint(tok_state, gen_state), files[0])
        expected = ({"trainer": {"vae_local": tok_state}}, {"trainer": {"var_wo_ddp": gen_state}})
    do_import(tmp_path, fixture, files)
    written = export_official(tmp_path / "run", tmp_path / "out")
    assert [p.name for p in written] == list(NAMES)  # the released names
    keys = (["model"], []) if layout == "released" else (["trainer", "vae_local"], ["trainer", "var_wo_ddp"])
    for path, want, original, nesting in zip(written, expected, (tok_state, gen_state), keys):
        state = read_official(path)
        assert list(state) == list(want)  # the top-level layout
        for key in nesting:
            state = state[key]
        assert list(state) == list(original)  # names, in FlexVAR's order (the extras in their places)
        for name, tensor in original.items():
            assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


# --------------------------------------------------------------------------------------------- (d) wrong files
def test_a_file_of_another_size_is_named_in_one_line_and_nothing_is_written(tmp_path, fixture):
    tok_state, gen_state = official_states(fixture)
    deeper = dict(gen_state)  # a third block: a deeper FlexVAR for the 2-block preset
    deeper.update({k.replace("blocks.1.", "blocks.2."): v for k, v in gen_state.items() if k.startswith("blocks.1.")})
    files = write(tmp_path, {"model": tok_state}, deeper)
    with pytest.raises(CheckpointMismatch) as err:
        do_import(tmp_path, fixture, files)
    message = str(err.value)
    assert message == (f"{files[1]} does not fit official={PRESET} (NextScaleGenerator): 13 unexpected "
                       "(blocks.2.attn.scale_mul_1H11, blocks.2.attn.q_bias, blocks.2.attn.v_bias, … (13 in all)); "
                       "is it the file of that model, or another size?")
    assert not (tmp_path / "run").exists() and not (tmp_path / "artifacts").exists()

    # FlexVAE's real codebook (8912 rows) for the tiny preset's 32: named in the file's own names
    bigger = {**tok_state, "quantize.embedding.weight": torch.zeros(8912, 32)}
    files = write(tmp_path, {"model": bigger}, gen_state)
    with pytest.raises(CheckpointMismatch, match=r"FlexVAE\.pth does not fit official=flexvar_d16 \(VQTokenizer\): "
                                                 r"1 of another shape \(quantize\.embedding\.weight 8912×32 in the "
                                                 r"file, 32×32 in the model\)"):
        do_import(tmp_path, fixture, files)

    # a VAR file (level embedding, a position table per token) for a FlexVAR preset
    var_like = {k: v for k, v in gen_state.items() if k != "pos_1LC"}
    var_like.update({"pos_1LC": torch.zeros(1, 680, 32), "lvl_embed.weight": torch.zeros(10, 32)})
    files = write(tmp_path, {"model": tok_state}, var_like)
    with pytest.raises(CheckpointMismatch, match=r"1 unexpected \(lvl_embed\.weight\); 1 of another shape "
                                                 r"\(pos_1LC 1×680×32 in the file, 1×32×32×32 in the model\)"):
        do_import(tmp_path, fixture, files)

    # the command line: one line, non-zero exit
    files = write(tmp_path, {"model": tok_state}, deeper)
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={files[0]}",
                          f"generator_file={files[1]}", *fixture["overrides"], f"hydra.run.dir={tmp_path / 'cli'}")
    errors = [line for line in done.stderr.splitlines() if line.startswith("arvision:")]
    assert done.returncode != 0 and errors == [f"arvision: error: {message}"]
    assert not (tmp_path / "cli" / "results.json").exists()


# --------------------------------------------------------------------------------------------- (e) every layout
@pytest.mark.parametrize("layout, found", [
    ("released", ("model", "")),                                      # FlexVAE.pth and FlexVARd*-epo*.pth
    ("training", ("trainer.vae_local", "trainer.var_wo_ddp")),        # ar-ckpt-epo*.pth: both models in one file
])
def test_every_layout_of_flexvars_files_is_read(layout, found, tmp_path, fixture):
    tok_state, gen_state = official_states(fixture)
    if layout == "released":
        files = write(tmp_path, {"model": tok_state}, gen_state)
    else:
        files = (tmp_path / "ar-ckpt-epo179.pth",) * 2
        torch.save(training_checkpoint(tok_state, gen_state), files[0])
    run = do_import(tmp_path, fixture, files)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (record["imported"]["files"]["tokenizer"]["layout"],
            record["imported"]["files"]["generator"]["layout"]) == found
    ours = run.generator.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in gen_state.items() if k != "attn_bias_for_masking")
    assert all(torch.equal(run.tokenizer.state_dict()[k], v) for k, v in tok_state.items()
               if k != "quantize.codebook_used")


def test_a_mask_of_another_schedule_is_kept_as_it_was_and_rebuilt_for_sampling(tmp_path, fixture):
    """FlexVAR's loaders overwrite `attn_bias_for_masking` (a training checkpoint holds the mask of its last random
    schedule, padded to a multiple of 8 for xformers): any one is read, kept for the export, and not used."""
    tok_state, gen_state = official_states(fixture)
    padded = torch.full((1, 1, 656, 656), float("-inf"))  # 654 tokens, padded to a multiple of 8
    padded[..., :654, :654] = flexvar_mask((1, 2, 3, 5, 6, 8, 11, 13, 15))
    padded[..., 654:, 654:] = 0.0
    files = write(tmp_path, {"model": tok_state}, {**gen_state, "attn_bias_for_masking": padded})
    run = do_import(tmp_path, fixture, files)
    reference = do_import(tmp_path, fixture, write(tmp_path, {"model": tok_state}, gen_state, names=("a.pt", "b.pt")),
                          run="reference")
    labels = torch.tensor([1, 2])
    draw = lambda r: r.generator.sample(labels, cfg=3.5, top_k=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw(run), draw(reference))
    written = export_official(tmp_path / "run", tmp_path / "out")
    assert torch.equal(read_official(written[1])["attn_bias_for_masking"], padded)


# --------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_build_the_released_models_with_the_readme_settings(preset, tmp_path):
    depth, params, file = PRESETS[preset]
    cfg = compose_import([f"official={preset}"], tmp_path)
    with torch.device("meta"):
        tokenizer = instantiate(cfg.tokenizer.model, image_size=cfg.data.image_size, image_channels=cfg.data.channels)
        generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=cfg.data.num_classes)
    assert round(sum(p.numel() for p in tokenizer.parameters()) / 1e6, 1) == 72.0  # FlexVAE.pth
    assert tokenizer.spec.vocab_size == 8912 and tokenizer.spec.dim == 32 and tokenizer.spec.grid == (16, 16)
    assert round(sum(p.numel() for p in generator.parameters()) / 1e6, 1) == params
    assert (generator.depth, generator.dim, generator.blocks[0].attn.heads) == (depth, 64 * depth, depth)
    assert not generator.residual and generator.pos_1LC.shape == (1, 64 * depth, 32, 32)
    assert generator.scales == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert (generator.ground_truth, generator.trim_last) == ("continuous", True)  # FlexVAR's training
    sample = OmegaConf.to_container(cfg.generator.sample)
    assert {k: sample[k] for k in ("cfg", "top_k", "top_p", "temperature", "cfg_schedule", "greedy_off_grid")} == {
        "cfg": 3.5, "top_k": 900, "top_p": 0.95, "temperature": 1.0, "cfg_schedule": "linear",
        "greedy_off_grid": True}
    official = cfg.official
    assert official.name == preset and official.files.generator == file and official.files.tokenizer == NAMES[0]
    readme = {"flexvar_d16": (3.05, 291.3), "flexvar_d20": (2.41, 299.3), "flexvar_d24": (2.21, 299.1)}[preset]
    assert (official.published.fid, official.published["is"]) == readme and "README" in official.published.source
    if preset == "flexvar_d24":
        assert official.published.zero_shot_13_steps.fid == 2.08
        assert list(official.published.zero_shot_13_steps.schedule) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16]
