"""ACDiT's official files (arvision.imports.acdit): parity with the official code from the golden fixture,
arvision-import → arvision-sample → arvision-eval end to end on random-weight official-layout files (the SD-VAE as a
diffusers folder, ACDiT as its training checkpoint), the name map both ways, and wrong files named in one line."""

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

from arvision.generators.acdit import ACDiTGenerator
from arvision.imports.acdit import GENERATOR_NAMES, ACDiTCheckpoints
from arvision.imports.base import CheckpointMismatch, find_state_dict, fit, read_official
from arvision.tokenizers.base import TokenSpec
from arvision.imports.runs import export_official, import_official
from tests.conftest import REPO, compose_import, run_import_cli
from tests.test_pipeline import compose_eval

FIXTURE = REPO / "tests" / "fixtures" / "parity" / "acdit.pt"


def tiny_generator(size: dict) -> ACDiTGenerator:
    spec = TokenSpec(name="vae", kind="continuous", layout="grid", grid=(size["side"],) * 2, dim=4)
    return ACDiTGenerator(spec=spec, num_classes=size["classes"], dim=size["dim"], depth=size["depth"],
                          heads=size["heads"], block_size=size["block"] ** 2, attention="sdpa")


def load(path: Path, generator: ACDiTGenerator, *, keys: tuple[str, ...] = ("model",)) -> str:
    family = ACDiTCheckpoints()
    state, layout = find_state_dict(read_official(path), path, keys)
    ours, extras = family.generator_to_ours(state, generator)
    assert not extras  # the official model has no buffers
    fit(generator, ours, path=path, preset="acdit_xl", official_names=family.generator_names(generator))
    return layout


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def imported(fixture, tmp_path_factory) -> ACDiTGenerator:
    """The fixture's official state dict written as the training script saves it and read back by the import."""
    path = tmp_path_factory.mktemp("acdit") / "ACDiT-XL-img.pt"
    torch.save({"model": fixture["state"], "ema": fixture["state"], "opt": {"state": {}, "param_groups": []},
                "lrs": {}, "args": argparse.Namespace(model="ACDiT-XL", block_size=16)}, path)
    generator = tiny_generator(fixture["size"])
    assert load(path, generator) == "model"
    return generator.eval()


# --------------------------------------------------------------------------------------------- golden fixture
def test_training_forward_equals_the_official_eps(fixture, imported):
    """ε of the training forward (clean blocks, then noisy blocks, skip-causal mask), from the official ACDiT at
    commit `official_commit` (experiments/parity/acdit.py --fixture)."""
    x = fixture["inputs"]
    with torch.no_grad():
        eps = imported(x["clean"], x["noisy"], x["t"], x["labels"]).flatten(1, 2)
    official = fixture["official"]["eps, training forward"]
    assert official.abs().max() > 0.1  # the random weights reach the output
    torch.testing.assert_close(eps, official, atol=fixture["tolerance"]["eps"], rtol=0)


def test_sampling_equals_the_official_dpm_solver_trajectories(fixture, imported):
    """Full DPM-Solver++ sampling (25 steps per block, KV cache, constant CFG) from the same seeded noise as the
    official `ACDiT.sample` with sample_img.py's scheduler; compared relative to the largest |latent| (the random
    model's latents reach ~500, where the official fp32 scheduler itself moves the result by ~3e-4)."""
    x = fixture["inputs"]
    official = fixture["official"]
    assert official[f"DPM-Solver++ timesteps, {x['steps']} steps"].tolist() == \
        imported.diffusion.inference_timesteps(x["steps"], "linspace", solver="dpm_solver")
    for cfg in x["cfgs"]:
        scale = x["scales"][cfg]
        expected = official[f"DPM-Solver++ {x['steps']} steps, cfg {cfg:g}: latents ÷ {scale:.0f}"]
        latents = imported.sample(x["sample_labels"], cfg=cfg, steps=x["steps"],
                                  generator=torch.Generator().manual_seed(x["seed"]))  # default spacing: official
        torch.testing.assert_close(imported.to_blocks(latents) / scale, expected,
                                   atol=fixture["tolerance"]["trajectory"], rtol=0)
    # the rows can fail: DPM-Solver's "leading" spacing (what a DDIM config would give) lands elsewhere
    cfg = x["cfgs"][0]
    leading = imported.sample(x["sample_labels"], cfg=cfg, steps=x["steps"], spacing="leading",
                              generator=torch.Generator().manual_seed(x["seed"]))
    expected = official[f"DPM-Solver++ {x['steps']} steps, cfg {cfg:g}: latents ÷ {x['scales'][cfg]:.0f}"]
    assert (imported.to_blocks(leading) / x["scales"][cfg] - expected).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------- import → sample → eval
def official_folder(fixture: dict, tmp_path: Path) -> tuple[Path, Path]:
    """The fixture's VAE as a diffusers folder (config.json + safetensors, as DiT-XL-2-256/vae) and its ACDiT as the
    training checkpoint."""
    diffusers = pytest.importorskip("diffusers")
    config = {k: v for k, v in fixture["vae_config"].items() if not k.startswith("_")}
    vae = diffusers.AutoencoderKL.from_config(config)
    vae.load_state_dict(fixture["vae"])
    vae.save_pretrained(tmp_path / "vae")
    checkpoint = tmp_path / "ACDiT-XL-img.pt"
    torch.save({"model": fixture["state"], "ema": fixture["state"], "args": argparse.Namespace(model="ACDiT-XL")},
               checkpoint)
    return tmp_path / "vae", checkpoint


def sample_config(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="sample", overrides=list(overrides))


def test_import_cli_then_decode_sample_and_eval(fixture, tmp_path, capsys):
    folder, checkpoint = official_folder(fixture, tmp_path)
    run = tmp_path / "imported"
    done = run_import_cli(tmp_path, f"official={fixture['preset']}", f"tokenizer_file={folder}",
                          f"generator_file={checkpoint}", "data=shapes", *fixture["overrides"],
                          f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    assert f"imported official={fixture['preset']}" in done.stdout
    record = json.loads((run / "results.json").read_text())
    assert record["imported"]["family"] == "acdit" and record["imported"]["files"]["generator"]["layout"] == "model"
    assert record["imported"]["published"]["fid"] == 2.45
    assert record["config"]["generator"]["sample"] == {"cfg": 1.5, "steps": 25, "sampler": "dpm_solver_pp",
                                                      "spacing": "linspace", "steps_offset": 0}

    # the imported run reproduces the official trajectory and its decode (the fixture's last cfg)
    loaded = pipeline.load_run(run)
    x = fixture["inputs"]
    cfg, scale = x["cfgs"][-1], x["scales"][x["cfgs"][-1]]
    latents = loaded.generator.eval().sample(x["sample_labels"], cfg=cfg, steps=x["steps"],
                                             generator=torch.Generator().manual_seed(x["seed"]))
    expected = fixture["official"][f"decoded images, cfg {cfg:g} (latents ÷ {scale:.0f})"]
    with torch.no_grad():
        images = loaded.tokenizer.eval().decode(latents / scale)
    torch.testing.assert_close(images, expected, atol=fixture["tolerance"]["images"], rtol=0)

    out = tmp_path / "samples.npz"
    sample_cli.main.__wrapped__(sample_config(f"run={run}", "num_samples=4", "batch_size=4", f"out={out}",
                                              "+sample.steps=3"))
    assert capsys.readouterr().out.startswith(f"wrote {out}: 4 samples")
    assert np.load(out)["arr_0"].shape == (4, 64, 64, 3)
    evaluate_cli.main.__wrapped__(compose_eval(
        f"run={run}", f"paths.artifact_dir={tmp_path / 'artifacts'}", f"paths.data_dir={tmp_path / 'data'}",
        "metrics.num_samples=4", "metrics.num_reference=16", "metrics.batch_size=4", "metrics.latency_batch_size=null",
        "metrics.classifier.epochs=0.1", "select=[fid,accuracy]", "+sample.steps=3"))
    evaluation = json.loads((run / "results.json").read_text())["evaluations"][-1]
    assert np.isfinite(evaluation["metrics"]["fid"]["value"]) and evaluation["metrics"]["fid"]["num_samples"] == 4


def test_export_writes_the_official_files_back(fixture, tmp_path):
    folder, checkpoint = official_folder(fixture, tmp_path)
    cfg = compose_import([f"official={fixture['preset']}", f"tokenizer_file={folder}",
                          f"generator_file={checkpoint}", "data=shapes", *fixture["overrides"]], tmp_path)
    import_official(cfg, tmp_path / "run")
    written = {p.name: p for p in export_official(tmp_path / "run", tmp_path / "out")}
    assert set(written) == {"diffusion_pytorch_model.safetensors", "config.json", "ACDiT-XL-img.pt"}
    from safetensors.torch import load_file
    vae = load_file(written["diffusion_pytorch_model.safetensors"])
    assert set(vae) == set(fixture["vae"]) and all(torch.equal(vae[k], fixture["vae"][k]) for k in vae)
    model = torch.load(written["ACDiT-XL-img.pt"], weights_only=True)
    assert list(model) == ["model"] and list(model["model"]) == list(fixture["state"])  # the official order
    assert all(torch.equal(model["model"][k], fixture["state"][k]) for k in fixture["state"])


# --------------------------------------------------------------------------------------------- names and files
def test_every_official_name_maps_and_back(fixture):
    generator = tiny_generator(fixture["size"])
    ours, extras = GENERATOR_NAMES.to_ours(fixture["state"])
    assert not extras and set(ours) == set(generator.state_dict())
    assert set(GENERATOR_NAMES.to_official(ours, extras)) == set(fixture["state"])
    assert GENERATOR_NAMES.ours("blocks.3.attn.q_norm.weight") == "layers.3.attention.q_norm.weight"
    assert GENERATOR_NAMES.official("final_layer.norm.weight") == "final_layer.norm_final.weight"


def test_ema_weights_are_read_when_asked(fixture, tmp_path):
    shifted = {k: v + 1 for k, v in fixture["state"].items()}
    path = tmp_path / "ACDiT-H-img.pt"
    torch.save({"model": fixture["state"], "ema": shifted}, path)
    generator = tiny_generator(fixture["size"])
    assert load(path, generator, keys=("ema", "model")) == "ema"
    torch.testing.assert_close(generator.x_embedder.weight, shifted["x_embedder.weight"])


def test_a_file_of_another_size_is_refused_in_one_line(fixture, tmp_path):
    path = tmp_path / "ACDiT-XL-img.pt"
    torch.save({"model": fixture["state"]}, path)
    wider = tiny_generator({**fixture["size"], "dim": 192, "heads": 3})
    with pytest.raises(CheckpointMismatch) as err:
        load(path, wider)
    message = str(err.value)
    assert "\n" not in message and "of another shape" in message and "another size" in message


def test_arvisions_earlier_block_does_not_take_official_files(fixture, tmp_path):
    """The swiglu / no-bias / no-QK-norm variant has other tensors: the strict load names them."""
    path = tmp_path / "ACDiT-XL-img.pt"
    torch.save({"model": fixture["state"]}, path)
    size = fixture["size"]
    spec = TokenSpec(name="vae", kind="continuous", layout="grid", grid=(size["side"],) * 2, dim=4)
    earlier = ACDiTGenerator(spec=spec, num_classes=size["classes"], dim=size["dim"], depth=size["depth"],
                             heads=size["heads"], block_size=size["block"] ** 2, mlp="swiglu", attn_bias=False,
                             qk_norm=False, rope="rope2d")
    with pytest.raises(CheckpointMismatch, match=r"missing \(blocks\.0\.mlp\.w1\.weight"):
        load(path, earlier)
