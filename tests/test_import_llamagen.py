"""LlamaGen's official files (arvision.imports.llamagen): parity with the official code from the golden fixture,
arvision-import → arvision-sample → arvision-eval end to end, the export round trip, wrong files named in one line,
every layout the released files use, and presets that build the released models with their evaluation settings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from arvision import pipeline
from arvision.cli import evaluate as evaluate_cli
from arvision.cli import sample as sample_cli
from arvision.cli.common import config_dir
from arvision.generators.sampling import top_k_filter, top_p_filter_llamagen
from arvision.imports.base import CheckpointMismatch, read_official
from arvision.imports.runs import export_official, import_official
from arvision.utils.instantiate import instantiate
from tests.conftest import REPO, compose_import, run_import_cli
from tests.test_pipeline import compose_eval

FIXTURE = REPO / "tests" / "fixtures" / "parity" / "llamagen.pt"
PRESET = "llamagen_c2i_b_256"
PRESETS = ["llamagen_c2i_b_256", "llamagen_c2i_l_256", "llamagen_c2i_b_384", "llamagen_c2i_l_384",
           "llamagen_c2i_xl_384", "llamagen_c2i_xxl_384", "llamagen_c2i_3b_384"]
# CPU-sized models of LlamaGen's structure (attention at the last level and in the middle, 32-channel GroupNorm, one
# res block per level, two in the decoder) on 16-px, 3-channel shapes of 4 classes.
TINY = ["data=shapes", "data.image_size=16", "data.channels=3", "data.num_classes=4", "tokenizer.model.ch=32",
        "tokenizer.model.ch_mult=[1,1]", "tokenizer.model.num_res_blocks=1", "tokenizer.model.z_channels=32",
        "tokenizer.model.vocab_size=64", "generator.model.dim=32", "generator.model.depth=2",
        "generator.model.heads=2", "generator.model.ffn_hidden=96"]
CODEBOOK_USED = "quantize.codebook_used"  # the official-only buffer (65 536 recently used code ids)



# --------------------------------------------------------------------------------------------- official-layout files
def official_states(tmp_path: Path, *extra: str, seed: int = 0) -> tuple[dict, dict]:
    """Official-layout state dicts of the tiny models (random weights): built by the preset, which names its tensors
    as LlamaGen does (experiments/parity/llamagen.py checks that against the official builders), plus the
    official-only codebook-usage buffer."""
    cfg = compose_import([f"official={PRESET}", *TINY, *extra], tmp_path)
    torch.manual_seed(seed)
    tokenizer = instantiate(cfg.tokenizer.model, image_size=16, image_channels=3)
    generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=4)
    with torch.no_grad():
        generator.output.weight.normal_(std=0.3)  # LlamaGen's zero init would make every logit equal
    used = torch.randint(0, 64, (65536,), generator=torch.Generator().manual_seed(seed)).float()
    return {**tokenizer.state_dict(), CODEBOOK_USED: used}, generator.state_dict()


def ddp_file(state: dict, **more) -> dict:
    """LlamaGen's DDP training file (train_c2i.py): weights under "model" beside the optimiser, steps and args."""
    return {"model": state, "optimizer": {"state": {}, "param_groups": []}, "steps": 5000,
            "args": argparse.Namespace(gpt_model="GPT-B", ema=bool(more)), **more}


def write(tmp_path: Path, tokenizer: object, generator: object) -> tuple[Path, Path]:
    tok, gen = tmp_path / "vq_ds16_c2i.pt", tmp_path / "c2i_B_256.pt"
    torch.save(tokenizer, tok)
    torch.save(generator, gen)
    return tok, gen


def do_import(tmp_path: Path, files: tuple[Path, Path], *extra: str, run: str = "run") -> pipeline.FinishedRun:
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={files[0]}", f"generator_file={files[1]}", *TINY,
                          *extra], tmp_path)
    import_official(cfg, tmp_path / run)
    return pipeline.load_run(tmp_path / run)


# --------------------------------------------------------------------------------------------- (a) golden fixture
def test_golden_fixture_outputs_equal_the_official_code(tmp_path):
    """The fixture holds official-layout state dicts (seeded random weights), inputs and the outputs of the official
    LlamaGen code at commit `official_commit` (experiments/parity/llamagen.py --fixture); the import reproduces
    every one of them."""
    fx = torch.load(FIXTURE, weights_only=True)
    official, inputs, settings, tol = fx["official"], fx["inputs"], fx["settings"], fx["tolerance"]
    files = write(tmp_path, {"model": fx["state"]["tokenizer"]}, ddp_file(fx["state"]["generator"]))
    cfg = compose_import([f"official={fx['preset']}", f"tokenizer_file={files[0]}", f"generator_file={files[1]}",
                          *fx["overrides"]], tmp_path)
    import_official(cfg, tmp_path / "run")
    run = pipeline.load_run(tmp_path / "run")
    tokenizer, generator = run.tokenizer, run.generator
    images, labels, greedy_labels = inputs["images"], inputs["labels"], inputs["greedy_labels"]
    cfg_scale, interval, seed = settings["cfg"], settings["cfg_interval"], settings["seed"]
    with torch.no_grad():
        indices = official["indices"]
        side = indices.shape[-1]
        rows = official["logits"].flatten(0, 1)
        ours = {
            "indices": tokenizer.encode(images),
            "reconstructions": tokenizer(images)["recon"],
            "decoded images": tokenizer.decode(indices),
            "logits": generator(inputs["tokens"].view(-1, side, side), labels),
            "top-k/top-p kept sets": torch.stack([top_p_filter_llamagen(top_k_filter(rows, k), p).isfinite()
                                                  for k, p in settings["kept"]]),
        }
    ours["greedy tokens, cfg"] = generator.sample(greedy_labels, cfg=cfg_scale, temperature=0.0)
    ours[f"greedy tokens, cfg_interval={interval}"] = generator.sample(greedy_labels, cfg=cfg_scale,
                                                                      cfg_interval=interval, temperature=0.0)
    ours["sampled tokens, cfg top-k top-p"] = generator.sample(
        greedy_labels, cfg=cfg_scale, top_k=settings["sampled_top_k"], top_p=settings["sampled_top_p"],
        generator=torch.Generator().manual_seed(seed))
    assert set(ours) == set(official)  # every recorded official output is checked
    for name, theirs in official.items():
        mine = ours[name].reshape(theirs.shape)
        if theirs.is_floating_point():
            assert (mine - theirs).abs().max().item() <= tol[name], name
        else:
            assert torch.equal(mine.to(theirs.dtype), theirs), name
    # the fixture is one a wrong cfg_interval rule fails: guiding two tokens fewer changes the sequence
    fewer = generator.sample(greedy_labels, cfg=cfg_scale, cfg_interval=interval - 2, temperature=0.0)
    assert not torch.equal(fewer.flatten(1), official[f"greedy tokens, cfg_interval={interval}"])


# --------------------------------------------------------------------------------------------- (b) end to end
def sample_config(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="sample", overrides=list(overrides))



def test_import_cli_then_sample_and_eval_the_imported_run(tmp_path, capsys):
    tok_state, gen_state = official_states(tmp_path)
    tok, gen = write(tmp_path, {"model": tok_state}, ddp_file(gen_state))
    run = tmp_path / "imported"
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={tok}",
                          f"generator_file={gen}", *TINY, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    assert f"imported official={PRESET}" in done.stdout and f"arvision-sample run={run}" in done.stdout
    record = json.loads((run / "results.json").read_text())
    imported = record["imported"]
    assert imported["family"] == "llamagen" and imported["preset"] == PRESET
    assert imported["files"]["tokenizer"]["layout"] == "model" == imported["files"]["generator"]["layout"]
    assert imported["published"]["fid"] == 5.46 and "cfg 1 = unguided" in imported["convention"]
    assert record["config"]["generator"]["sample"] == {"cfg": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                                      "decode": "eager", "cfg_interval": -1}

    out = tmp_path / "samples.npz"
    sample_cli.main.__wrapped__(sample_config(f"run={run}", "num_samples=8", "batch_size=4", f"out={out}"))
    assert capsys.readouterr().out.startswith(f"wrote {out}: 8 samples")
    npz = np.load(out)
    assert npz["arr_0"].shape == (8, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert np.bincount(npz["labels"], minlength=4).tolist() == [2, 2, 2, 2]

    evaluate_cli.main.__wrapped__(compose_eval(
        f"run={run}", f"paths.artifact_dir={tmp_path / 'artifacts'}", f"paths.data_dir={tmp_path / 'data'}",
        "metrics.num_samples=8", "metrics.num_reference=32", "metrics.batch_size=8", "metrics.latency_batch_size=null",
        "metrics.classifier.epochs=0.1", "select=[fid,accuracy,sampling]"))
    evaluation = json.loads((run / "results.json").read_text())["evaluations"][-1]
    assert np.isfinite(evaluation["metrics"]["fid"]["value"]) and evaluation["metrics"]["fid"]["num_samples"] == 8
    assert 0.0 <= evaluation["metrics"]["accuracy"]["value"] <= 1.0


# --------------------------------------------------------------------------------------------- (c) round trip
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_export_writes_the_official_files_back(layout, tmp_path):
    tok_state, gen_state = official_states(tmp_path)
    gen_file = ddp_file(gen_state) if layout == "ddp" else gen_state
    files = write(tmp_path, {"model": tok_state}, gen_file)
    do_import(tmp_path, files)
    written = export_official(tmp_path / "run", tmp_path / "out")
    assert [p.name for p in written] == ["vq_ds16_c2i.pt", "c2i_B_256.pt"]  # the released names
    for path, expected in ((written[0], {"model": tok_state}),
                           (written[1], {"model": gen_state} if layout == "ddp" else gen_state)):
        back = read_official(path)
        assert list(back) == list(expected)  # the top-level layout (training-only entries are not carried)
        state, original = (back["model"], expected["model"]) if "model" in expected else (back, expected)
        assert list(state) == list(original)  # names, in the official order
        for name, tensor in original.items():
            assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert torch.equal(read_official(written[0])["model"][CODEBOOK_USED], tok_state[CODEBOOK_USED])  # the extra


# --------------------------------------------------------------------------------------------- (d) wrong files
def test_a_file_of_another_size_is_named_in_one_line_and_nothing_is_written(tmp_path, capsys):
    tok_state, _ = official_states(tmp_path)
    _, deeper = official_states(tmp_path, "generator.model.depth=3")  # a 3-layer GPT for the 2-layer preset
    files = write(tmp_path, {"model": tok_state}, ddp_file(deeper))
    with pytest.raises(CheckpointMismatch) as err:
        do_import(tmp_path, files)
    message = str(err.value)
    assert message == (f"{files[1]} does not fit official={PRESET} (RasterGenerator): 7 unexpected "
                       "(layers.2.attention_norm.weight, layers.2.attention.wqkv.weight, layers.2.attention.wo.weight, "
                       "… (7 in all)); is it the file of that model, or another size?")
    assert not (tmp_path / "run").exists() and not (tmp_path / "artifacts").exists()

    bigger, _ = official_states(tmp_path, "tokenizer.model.vocab_size=128")  # a codebook of another size
    files = write(tmp_path, {"model": bigger}, ddp_file(official_states(tmp_path)[1]))
    with pytest.raises(CheckpointMismatch, match=r"vq_ds16_c2i\.pt does not fit official=llamagen_c2i_b_256 "
                                                 r"\(VQTokenizer\): 1 of another shape \(quantize\.embedding\.weight "
                                                 r"128×8 in the file, 64×8 in the model\)"):
        do_import(tmp_path, files)

    # the command line: one line, non-zero exit
    files = write(tmp_path, {"model": tok_state}, ddp_file(deeper))
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={files[0]}",
                          f"generator_file={files[1]}", *TINY, f"hydra.run.dir={tmp_path / 'cli'}")
    errors = [line for line in done.stderr.splitlines() if line.startswith("arvision:")]
    assert done.returncode != 0 and errors == [f"arvision: error: {message}"]
    assert not (tmp_path / "cli" / "results.json").exists()


# --------------------------------------------------------------------------------------------- (e) every layout
@pytest.mark.parametrize("layout, ema, found", [
    ("ddp", False, "model"),             # c2i_B/L_256/384, c2i_XL_384: DDP training files
    ("ddp_ema", False, "model"),         # with an EMA copy: the official sampler reads "model" (the presets' ema)
    ("ddp_ema", True, "ema"),            # ema=true takes the EMA weights
    ("fsdp", False, ""),                 # c2i_XXL_384, c2i_3B_384: FSDP-consolidated plain state dicts
    ("module", False, "module"),         # DeepSpeed, which the official sampler also reads
    ("state_dict", False, "state_dict"),
    ("wrapped", False, "model"),         # names still carrying DDP's module. and torch.compile's _orig_mod.
])
def test_every_layout_of_the_released_files_is_read(layout, ema, found, tmp_path):
    tok_state, weights = official_states(tmp_path, seed=1)
    _, other = official_states(tmp_path, seed=2)
    expected = other if found == "ema" else weights
    generator_file = {
        "ddp": ddp_file(weights), "ddp_ema": ddp_file(weights, ema=other), "fsdp": weights,
        "module": {"module": weights, "epoch": 1}, "state_dict": {"state_dict": weights},
        "wrapped": ddp_file({f"module._orig_mod.{k}": v for k, v in weights.items()}),
    }[layout]
    files = write(tmp_path, {"model": tok_state}, generator_file)
    run = do_import(tmp_path, files, f"ema={str(ema).lower()}")
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["imported"]["files"]["generator"]["layout"] == found
    for name, tensor in run.generator.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert torch.equal(run.tokenizer.quantize.embedding.weight, tok_state["quantize.embedding.weight"])


# --------------------------------------------------------------------------------------------- presets
# Parameter counts of the official builders (GPT_models[...] and VQ_models['VQ-16'] at ce98ec4, counted by
# experiments/parity/llamagen.py, which also matches every name and shape).
OFFICIAL_PARAMS = {"B": 110_888_448, "L": 342_910_976, "XL": 774_699_520, "XXL": 1_410_972_672, "3B": 3_096_659_200}
VQ_PARAMS = 71_883_403  # without the 65 536-entry codebook_used buffer


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build_the_released_models_with_their_evaluation_settings(preset, tmp_path):
    cfg = compose_import([f"official={preset}"], tmp_path)
    size, side = preset.split("_")[2].upper(), int(preset.split("_")[3])
    with torch.device("meta"):
        tokenizer = instantiate(cfg.tokenizer.model, image_size=cfg.data.image_size, image_channels=cfg.data.channels)
        generator = instantiate(cfg.generator.model)(spec=tokenizer.spec, num_classes=cfg.data.num_classes)
    assert sum(p.numel() for p in generator.parameters()) == OFFICIAL_PARAMS[size]
    assert sum(p.numel() for p in tokenizer.parameters()) == VQ_PARAMS
    assert (cfg.data.image_size, tokenizer.spec.grid) == (side, (side // 16, side // 16))  # 24×24 tokens at 384
    assert generator.cls_embedding.embedding_table.weight.shape[0] == 1001  # null class 1000
    expected_cfg = {"B": 2.0, "L": 2.0, "XL": 1.75, "XXL": 1.75, "3B": 1.65}[size]
    assert dict(cfg.generator.sample) == {"cfg": expected_cfg, "cfg_interval": -1, "temperature": 1.0, "top_k": 0,
                                          "top_p": 1.0, "decode": "eager"}
    assert cfg.official.name == preset and cfg.ema is False
    assert cfg.official.files.generator == f"c2i_{size}_{side}.pt" and cfg.official.files.tokenizer == "vq_ds16_c2i.pt"
    assert cfg.official.published.fid > 0 and cfg.official.published.source
    if side == 384:
        assert "bicubic resize" in cfg.official.convention  # LlamaGen scores its 384-px samples at 256 px
