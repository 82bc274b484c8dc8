"""VAR's official files (arvision.imports.var): parity with the official code from the golden fixture,
arvision-import → arvision-sample → arvision-eval end to end, the export round trip, wrong files named in one line,
every layout VAR's files use, and presets that build the released models with the README's evaluation settings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from arvision import pipeline
from arvision.cli import evaluate as evaluate_cli
from arvision.cli import sample as sample_cli
from arvision.generators.next_scale import smooth_codes
from arvision.generators.sampling import top_k_filter, top_p_filter
from arvision.imports.base import CheckpointMismatch, read_official
from arvision.imports.runs import export_official, import_official
from arvision.imports.var import fuse_qkv, split_qkv, tokenizer_names, var_buffers
from arvision.utils.instantiate import instantiate
from tests.conftest import REPO, compose_config, compose_import, run_import_cli

FIXTURE = REPO / "tests" / "fixtures" / "parity" / "var.pt"
PRESET = "var_d16"
PRESETS = {"var_d16": (16, 310.3), "var_d20": (20, 600.9), "var_d24": (24, 1033.4), "var_d30": (30, 2010.0),
           "var_d36": (36, 2353.9)}  # depth, parameters (M) of the official builder (experiments/parity/var.py)
# The fixture's tiny models (the official classes, narrowed) on 8-px, 3-channel shapes of its 10 classes.
DATA = ["data=shapes", "data.image_size=8", "data.channels=3", "data.num_classes=10"]
EXTRAS = ("lvl_1L", "attn_bias_for_masking")


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)



def write(tmp_path: Path, tokenizer: object, generator: object, names=("vae_ch160v4096z32.pth", "var_d16.pth")
          ) -> tuple[Path, Path]:
    tok, gen = tmp_path / names[0], tmp_path / names[1]
    torch.save(tokenizer, tok)
    torch.save(generator, gen)
    return tok, gen


def do_import(tmp_path: Path, fx: dict, files: tuple[Path, Path], *extra: str, run: str = "run"
              ) -> pipeline.FinishedRun:
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={files[0]}", f"generator_file={files[1]}",
                          *fx["overrides"], *extra], tmp_path)
    import_official(cfg, tmp_path / run)
    return pipeline.load_run(tmp_path / run)


def training_checkpoint(vae: dict, var: dict) -> dict:
    """VAR's `ar-ckpt-last.pth` (train.py / trainer.py): both models under `trainer`, beside the optimiser, the
    trainer's config and the pickled args."""
    return {"epoch": 3, "iter": 0, "trainer": {"config": {"pg": 0.0}, "var_wo_ddp": var, "vae_local": vae,
                                               "var_opt": {"param_groups": []}},
            "args": argparse.Namespace(depth=16, pn="1_2_3_4", saln=False)}


class HeadCalls:
    def __init__(self, generator: torch.nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = generator.head.register_forward_hook(lambda mod, inp, out: self.outputs.append(out.float()))

    def __enter__(self) -> HeadCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# --------------------------------------------------------------------------------------------- (a) golden fixture
def test_golden_fixture_outputs_equal_the_official_code(tmp_path, fixture):
    """The fixture holds official-layout state dicts (the official VQVAE and VAR classes, seeded random weights),
    inputs and the official code's outputs (experiments/parity/var.py --fixture at `official_commit`); the import
    reproduces every one of them."""
    fx = fixture
    official, inputs, settings, tol = fx["official"], fx["inputs"], fx["settings"], fx["tolerance"]
    run = do_import(tmp_path, fx, write(tmp_path, fx["state"]["tokenizer"], fx["state"]["generator"]))
    tokenizer, generator = run.tokenizer, run.generator
    scales = generator.scales
    var_cfg, seed, top_k, top_p = settings["var_cfg"], settings["seed"], settings["top_k"], settings["top_p"]
    images, labels, sample_labels = inputs["images"], inputs["labels"], inputs["sample_labels"]
    indices = official["tokenizer indices"]
    maps = list(indices.split([n * n for n in scales], dim=1))
    maps = [m.view(-1, n, n) for m, n in zip(maps, scales)]
    logits = inputs["guided_logits"]
    ours = {}
    with torch.no_grad():
        ours["tokenizer indices"] = torch.cat([t.flatten(1) for t in tokenizer.encode(images)], dim=1)
        ours["teacher-forcing inputs"] = tokenizer.teacher_forcing_inputs(maps)
        ours["decoded images (indices)"] = tokenizer.decode(maps)
        rows = torch.cat([labels, torch.tensor([generator.num_classes])])
        cycled = [m.repeat(-(-rows.shape[0] // m.shape[0]), 1, 1)[:rows.shape[0]] for m in maps]
        ours["teacher-forced logits"] = generator(cycled, rows)
        ours["top-k/top-p kept sets"] = torch.stack([top_p_filter(top_k_filter(logits, k), p).isfinite()
                                                     for k, p in settings["kept"]])
        ours["more_smooth codebook mix (same logits, noise)"] = torch.stack([
            smooth_codes(top_k_filter(logits, top_k), tokenizer.code_vectors(), ratio=r,
                         generator=torch.Generator().manual_seed(seed)) for r in (0.0, 0.5, 1.0)])
    with HeadCalls(generator) as calls:
        greedy = generator.sample(sample_labels, cfg=1 + var_cfg, temperature=0.0)
    ours["greedy tokens, cfg"] = torch.cat([m.flatten(1) for m in greedy], dim=1)
    ours["greedy decoded image"] = tokenizer.decode(greedy) * 0.5 + 0.5
    ours["cached-pass logits (greedy run)"] = torch.cat(calls.outputs, dim=1)
    drawn = generator.sample(sample_labels, cfg=1 + var_cfg, top_k=top_k, top_p=top_p,
                             generator=torch.Generator().manual_seed(seed))
    ours["sampled tokens, cfg top-k top-p"] = torch.cat([m.flatten(1) for m in drawn], dim=1)
    smooth = generator.sample(sample_labels, cfg=1 + var_cfg, top_k=top_k, top_p=top_p, more_smooth=True,
                              generator=torch.Generator().manual_seed(seed))
    ours["more_smooth decoded image (seeded)"] = tokenizer.decode(smooth) * 0.5 + 0.5
    assert set(ours) == set(official)  # every recorded official output is checked
    for name, theirs in official.items():
        mine = ours[name].reshape(theirs.shape)
        if theirs.is_floating_point():
            assert (mine - theirs).abs().max().item() <= tol[name], name
        else:
            assert torch.equal(mine.to(theirs.dtype), theirs), name
    # the fixture is one a wrong guidance ramp fails: VAR's cfg read as arvision's (one off) changes the sequence
    wrong = generator.sample(sample_labels, cfg=var_cfg, temperature=0.0)
    assert not torch.equal(torch.cat([m.flatten(1) for m in wrong], dim=1), official["greedy tokens, cfg"])


# --------------------------------------------------------------------------------------------- (b) end to end
def test_import_cli_then_sample_and_eval_the_imported_run(tmp_path, fixture, capsys):
    tok, gen = write(tmp_path, fixture["state"]["tokenizer"], fixture["state"]["generator"])
    run = tmp_path / "imported"
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={tok}",
                          f"generator_file={gen}", *fixture["overrides"], *DATA, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    assert f"imported official={PRESET}" in done.stdout and f"arvision-sample run={run}" in done.stdout
    record = json.loads((run / "results.json").read_text())
    imported = record["imported"]
    assert imported["family"] == "var" and imported["preset"] == PRESET
    assert imported["files"]["tokenizer"]["layout"] == "" == imported["files"]["generator"]["layout"]  # plain
    assert imported["published"]["fid"] == 3.55 and imported["published"]["paper"]["fid"] == 3.30
    assert "cfg=2.5" in imported["convention"] and "cfg 1 = unguided" in imported["convention"]
    sample = record["config"]["generator"]["sample"]  # the README's FID setting, in arvision's convention
    assert {k: sample[k] for k in ("cfg", "temperature", "top_k", "top_p", "cfg_schedule", "more_smooth")} == {
        "cfg": 2.5, "temperature": 1.0, "top_k": 900, "top_p": 0.96, "cfg_schedule": "linear", "more_smooth": False}

    out = tmp_path / "samples.npz"
    sample_cli.main.__wrapped__(compose_config("sample", [f"run={run}", "num_samples=10", "batch_size=5",
                                                          f"out={out}"], tmp_path))
    assert capsys.readouterr().out.startswith(f"wrote {out}: 10 samples")
    npz = np.load(out)
    assert npz["arr_0"].shape == (10, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    assert np.bincount(npz["labels"], minlength=10).tolist() == [1] * 10

    evaluate_cli.main.__wrapped__(compose_config("eval", [
        f"run={run}", "metrics.num_samples=10", "metrics.num_reference=40", "metrics.batch_size=10",
        "metrics.latency_batch_size=null", "metrics.classifier.epochs=0.1", "select=[fid,accuracy,sampling]"],
        tmp_path))
    evaluation = json.loads((run / "results.json").read_text())["evaluations"][-1]
    assert np.isfinite(evaluation["metrics"]["fid"]["value"]) and evaluation["metrics"]["fid"]["num_samples"] == 10
    assert 0.0 <= evaluation["metrics"]["accuracy"]["value"] <= 1.0

    # more_smooth as a sampling override: float code maps that the tokenizer decodes
    smooth = tmp_path / "smooth.npz"
    sample_cli.main.__wrapped__(compose_config("sample", [f"run={run}", "num_samples=4", "batch_size=4",
                                                          f"out={smooth}", "+sample.more_smooth=true"], tmp_path))
    assert np.load(smooth)["arr_0"].shape == (4, 8, 8, 3)


# --------------------------------------------------------------------------------------------- (c) round trip
@pytest.mark.parametrize("layout", ["plain", "training"])
def test_export_writes_the_official_files_back(layout, tmp_path, fixture):
    tok_state, gen_state = fixture["state"]["tokenizer"], fixture["state"]["generator"]
    if layout == "plain":
        expected = (tok_state, gen_state)
        files = write(tmp_path, *expected)
    else:  # both from one training checkpoint; each export file keeps its model's nesting, without the rest
        files = (tmp_path / "ar-ckpt-last.pth",) * 2
        torch.save(training_checkpoint(tok_state, gen_state), files[0])
        expected = ({"trainer": {"vae_local": tok_state}}, {"trainer": {"var_wo_ddp": gen_state}})
    do_import(tmp_path, fixture, files)
    written = export_official(tmp_path / "run", tmp_path / "out")
    assert [p.name for p in written] == ["vae_ch160v4096z32.pth", "var_d16.pth"]  # the released names
    for path, want, original in zip(written, expected, (tok_state, gen_state)):
        back = read_official(path)
        assert list(back) == list(want)  # the top-level layout
        state = back if layout == "plain" else next(iter(next(iter(back.values())).values()))
        assert list(state) == list(original)  # names, in the official order (fused qkv, decoder levels, buffers)
        for name, tensor in original.items():
            assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    # the official-only tensors travelled as extras: VAR's buffers and the code-hit statistics
    assert torch.equal(read_official(written[0])["quantize.ema_vocab_hit_SV"] if layout == "plain" else
                       read_official(written[0])["trainer"]["vae_local"]["quantize.ema_vocab_hit_SV"],
                       tok_state["quantize.ema_vocab_hit_SV"])


def test_fused_attention_and_reversed_decoder_levels_map_both_ways(fixture):
    state = fixture["state"]["tokenizer"]
    split = split_qkv(state)
    qkv = state["encoder.mid.attn_1.qkv.weight"]
    c = qkv.shape[0] // 3
    assert torch.equal(split["encoder.mid.attn_1.k.weight"], qkv[c:2 * c]) and "encoder.mid.attn_1.qkv.weight" \
        not in split
    assert fuse_qkv(split).keys() == state.keys() and all(torch.equal(fuse_qkv(split)[k], v) for k, v in state.items())
    names = tokenizer_names(levels=2, phi_count=4)  # the fixture's 2-level VQVAE
    assert names.ours("decoder.up.1.block.2.conv1.weight") == "decoder.conv_blocks.0.res.2.conv1.weight"
    assert names.ours("decoder.up.0.upsample.conv.weight") == "decoder.conv_blocks.1.upsample.conv.weight"
    assert names.ours("encoder.down.1.attn.0.q.bias") == "encoder.conv_blocks.1.attn.0.q.bias"
    assert names.ours("quantize.quant_resi.qresi_ls.3.weight") == "quantize.quant_resi.3.weight"
    assert tokenizer_names(levels=5, phi_count=1).official("quantize.quant_resi.0.bias") == \
        "quantize.quant_resi.qresi.bias"
    assert names.official(names.ours("decoder.mid.block_2.norm1.bias")) == "decoder.mid.block_2.norm1.bias"


# --------------------------------------------------------------------------------------------- (d) wrong files
def test_a_file_of_another_size_is_named_in_one_line_and_nothing_is_written(tmp_path, fixture):
    tok_state, gen_state = fixture["state"]["tokenizer"], fixture["state"]["generator"]
    deeper = dict(gen_state)  # a third block: a deeper VAR for the 2-block preset
    deeper.update({k.replace("blocks.1.", "blocks.2."): v for k, v in gen_state.items() if k.startswith("blocks.1.")})
    files = write(tmp_path, tok_state, deeper)
    with pytest.raises(CheckpointMismatch) as err:
        do_import(tmp_path, fixture, files)
    message = str(err.value)
    assert message == (f"{files[1]} does not fit official={PRESET} (NextScaleGenerator): 13 unexpected "
                       "(blocks.2.attn.scale_mul_1H11, blocks.2.attn.q_bias, blocks.2.attn.v_bias, … (13 in all)); "
                       "is it the file of that model, or another size?")
    assert not (tmp_path / "run").exists() and not (tmp_path / "artifacts").exists()

    # a codebook of another size, named in the file's own (official) names
    bigger = {**tok_state, "quantize.embedding.weight": torch.zeros(128, 8)}
    files = write(tmp_path, bigger, gen_state)
    with pytest.raises(CheckpointMismatch, match=r"vae_ch160v4096z32\.pth does not fit official=var_d16 "
                                                 r"\(MultiScaleVQTokenizer\): 1 of another shape "
                                                 r"\(quantize\.embedding\.weight 128×8 in the file, 64×8 in the model\)"):
        do_import(tmp_path, fixture, files)

    # a file made for other scales with as many tokens (1, 2, 5: 30, like 1, 2, 3, 4): only VAR's buffers tell
    other = {**gen_state, **var_buffers((1, 2, 5))}
    files = write(tmp_path, tok_state, other)
    with pytest.raises(CheckpointMismatch, match=r"lvl_1L \(1×30\) is not the one VAR builds for the scales "
                                                 r"\(1, 2, 3, 4\)"):
        do_import(tmp_path, fixture, files)

    # the command line: one line, non-zero exit
    files = write(tmp_path, tok_state, deeper)
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={files[0]}",
                          f"generator_file={files[1]}", *fixture["overrides"], f"hydra.run.dir={tmp_path / 'cli'}")
    errors = [line for line in done.stderr.splitlines() if line.startswith("arvision:")]
    assert done.returncode != 0 and errors == [f"arvision: error: {message}"]
    assert not (tmp_path / "cli" / "results.json").exists()


# --------------------------------------------------------------------------------------------- (e) every layout
@pytest.mark.parametrize("layout, found", [
    ("plain", ("", "")),                                              # the released vae_*.pth and var_d*.pth
    ("training", ("trainer.vae_local", "trainer.var_wo_ddp")),        # ar-ckpt-last.pth: both models in one file
])
def test_every_layout_of_vars_files_is_read(layout, found, tmp_path, fixture):
    tok_state, gen_state = fixture["state"]["tokenizer"], fixture["state"]["generator"]
    if layout == "plain":
        files = write(tmp_path, tok_state, gen_state)
    else:
        files = (tmp_path / "ar-ckpt-last.pth",) * 2
        torch.save(training_checkpoint(tok_state, gen_state), files[0])
    run = do_import(tmp_path, fixture, files)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (record["imported"]["files"]["tokenizer"]["layout"],
            record["imported"]["files"]["generator"]["layout"]) == found
    ours = run.generator.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in gen_state.items() if k not in EXTRAS)
    assert torch.equal(run.tokenizer.state_dict()["quantize.embedding.weight"], tok_state["quantize.embedding.weight"])


# --------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_build_the_released_models_with_the_readme_settings(preset, tmp_path):
    depth, params = PRESETS[preset]
    cfg = compose_import([f"official={preset}"], tmp_path)
    with torch.device("meta"):
        tokenizer = instantiate(cfg.tokenizer.model, image_size=cfg.data.image_size, image_channels=cfg.data.channels)
        generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=cfg.data.num_classes)
    assert round(sum(p.numel() for p in tokenizer.parameters()) / 1e6, 1) == 108.9  # vae_ch160v4096z32.pth
    assert round(sum(p.numel() for p in generator.parameters()) / 1e6, 1) == params
    assert (generator.depth, generator.dim, generator.blocks[0].attn.heads) == (depth, 64 * depth, depth)
    assert generator.blocks[-1].drop_path.p == pytest.approx(0.1 * depth / 24)  # VAR's rule, last block
    assert tokenizer.spec.scales == ((1, 2, 3, 4, 6, 9, 13, 18, 24, 32) if preset == "var_d36" else
                                     (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert cfg.data.image_size == (512 if preset == "var_d36" else 256) and cfg.generator.model.shared_aln == \
        (preset == "var_d36")
    sample = OmegaConf.to_container(cfg.generator.sample)
    assert {k: sample[k] for k in ("cfg", "top_k", "top_p", "temperature", "more_smooth")} == {
        "cfg": 2.5, "top_k": 900, "top_p": 0.96, "temperature": 1.0, "more_smooth": False}
    official = cfg.official
    assert official.name == preset and official.files.generator == f"{preset}.pth"
    assert official.files.tokenizer == "vae_ch160v4096z32.pth"
    readme = {"var_d16": 3.55, "var_d20": 2.95, "var_d24": 2.33, "var_d30": 1.97, "var_d36": 2.63}[preset]
    paper = {"var_d16": (3.30, 274.4), "var_d20": (2.57, 302.6), "var_d24": (2.09, 312.9),
             "var_d30": (1.92, 323.1), "var_d36": (2.63, 303.2)}[preset]
    assert official.published.fid == readme and "README" in official.published.source
    assert (official.published.paper.fid, official.published.paper["is"]) == paper
    assert "paper" in official.published.paper.source


def test_bench_preset_builds_the_official_tokenizer(tmp_path):
    cfg = compose_config("bench", ["bench_preset=var_d16"], tmp_path)
    assert OmegaConf.to_container(cfg.tokenizer.model) == OmegaConf.to_container(
        compose_import(["official=var_d16"], tmp_path).tokenizer.model)
    assert cfg.tokenizer.model.num_res_blocks == 2 and cfg.tokenizer.model.attn_last_level
    assert cfg.preset_name == "var_d16" and cfg.generator.sample.top_k == 900
