"""MAR's official files (arvision.imports.mar): parity with the official code from the golden fixture,
arvision-import → arvision-sample → arvision-eval end to end on random-weight official-layout files, the export
round trip (the EMA copy read, written back under `model_ema`), a file of another size named in one line, and
presets that build MAR-B, -L and -H with the README's evaluation settings."""

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
from arvision.generators.mar import MARGenerator, masked_by_order
from arvision.imports.base import CheckpointMismatch, read_official
from arvision.imports.mar import MARCheckpoints
from arvision.imports.runs import export_official, import_official
from arvision.tokenizers.kl16 import KL16Tokenizer
from arvision.utils.instantiate import instantiate
from tests.conftest import REPO, compose_config, compose_import, run_import_cli

FIXTURE = REPO / "tests" / "fixtures" / "parity" / "mar.pt"
PRESET = "mar_b"
GENERATOR_FILE = "checkpoint-last.pth"
# the fixture's tokenizer side: MAR's KL-16 narrowed to 16-px images → 8×8×16 latents
VAE = dict(image_size=16, image_channels=3, ch=32, ch_mult=(1, 1), num_res_blocks=1, embed_dim=16)
# a tiny random MAR for the end-to-end run: 10 classes of 32-px shapes, 8×8 tokens
E2E_VAE = dict(image_size=32, image_channels=3, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, embed_dim=16)
E2E_MODEL = dict(dim=32, depth=1, heads=2, buffer_size=4, head_width=32, head_depth=2)
E2E = ["data=shapes", "data.image_size=32", "data.channels=3", "data.num_classes=10", "tokenizer.model.ch=32",
       "tokenizer.model.ch_mult=[1,1,1]", "tokenizer.model.num_res_blocks=1",
       *[f"generator.model.{k}={v}" for k, v in E2E_MODEL.items()]]


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def kl16_file(tmp_path: Path, vae: dict, seed: int = 0) -> Path:
    """A random-weight KL-16 in kl16.ckpt's layout ({"model": …}, MAR's names)."""
    torch.manual_seed(seed)
    tokenizer = KL16Tokenizer(**vae)
    state = MARCheckpoints().tokenizer_to_official(tokenizer.state_dict(), {}, tokenizer)
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": state}, path)
    return path


def checkpoint_file(tmp_path: Path, ema: dict[str, torch.Tensor], name: str = GENERATOR_FILE) -> Path:
    """main_mar.py's checkpoint-last.pth: `model` (the EMA weights + 1 here), `model_ema`, optimizer, args."""
    path = tmp_path / name
    torch.save({"model": {k: v + 1.0 for k, v in ema.items()}, "model_ema": ema, "optimizer": {}, "epoch": 799,
                "scaler": {}, "args": argparse.Namespace(model="mar_base", buffer_size=64)}, path)
    return path


def do_import(tmp_path: Path, files: tuple[Path, Path], overrides: list[str], *extra: str, run: str = "run"
              ) -> pipeline.FinishedRun:
    cfg = compose_import([f"official={PRESET}", f"tokenizer_file={files[0]}", f"generator_file={files[1]}",
                          *overrides, *extra], tmp_path)
    import_official(cfg, tmp_path / run)
    return pipeline.load_run(tmp_path / run)


def replay(generator: MARGenerator, orders: torch.Tensor, num_masked: int | None = None) -> None:
    """MAR's orders (first k masked) as arvision's generation orders (last k masked), and MAR's masked count; set
    on the instance without a torch draw, so both sides' torch streams stay aligned. `forget` removes them."""
    generator.orders = lambda batch, *, device, generator=None: orders.flip(1).to(device)
    if num_masked is not None:
        generator.num_masked = lambda: num_masked


def forget(generator: MARGenerator) -> None:
    for name in ("orders", "num_masked"):
        generator.__dict__.pop(name, None)


def sampled(generator: MARGenerator, fx: dict, run: str, orders: torch.Tensor, **change) -> torch.Tensor:
    num_iter, cfg, schedule, temperature, steps = fx["sampling_runs"][run]
    settings = {"cfg": cfg, "num_iter": num_iter, "num_sampling_steps": steps, "temperature": temperature,
                "cfg_schedule": schedule, "remask": "random", "clip_denoised": 0.0, **change}
    replay(generator, orders)
    torch.manual_seed(fx["inputs"]["sampling_seeds"][run])
    try:
        return generator.sample(fx["inputs"]["sample_labels"], **settings)
    finally:
        forget(generator)


# --------------------------------------------------------------------------------------------- (a) golden fixture
def test_golden_fixture_outputs_equal_the_official_code(tmp_path, fixture):
    """The fixture holds an official-layout MAR (the official class, seeded random weights, a 32-wide encoder and a
    24-wide two-block decoder), inputs and the official code's outputs (experiments/parity/mar.py --fixture at
    `official_commit`); the import of `model_ema` reproduces every one of them."""
    fx, inputs = fixture, fixture["inputs"]
    run = do_import(tmp_path, (kl16_file(tmp_path, VAE), checkpoint_file(tmp_path, fx["generator"])),
                    fx["overrides"])
    generator = run.generator.eval()
    official, tol = fx["official"], fx["tolerance"]
    ours = {}
    with torch.no_grad():
        masked = masked_by_order(inputs["orders"].flip(1), inputs["num_masked"])
        h = generator.forward_mae_encoder(generator.sequence(inputs["latents"]), masked,
                                          generator.class_embedding(inputs["labels"]))
        ours["conditions z (masked batch)"] = generator.forward_mae_decoder(h, masked)
        z = official["conditions z (masked batch)"].flatten(0, 1)  # the head reads MAR's z, as the harness did
        ours["head output (ε, variance)"] = generator.diffloss.net(inputs["x_t"], inputs["t"].float(), z)
        process = generator.diffloss.train_diffusion
        target = generator.sequence(inputs["latents"]).flatten(0, 1)
        x_t = process.add_noise(target, inputs["noise"], inputs["t"])
        mse, vb = process.loss_terms(generator.diffloss.net(x_t, inputs["t"].float(), z), target, x_t,
                                     inputs["noise"], inputs["t"])
        ours["loss terms: ε-MSE per row"], ours["loss terms: VLB per row"] = mse, vb
        train = inputs["train"]
        replay(generator, train["orders"], train["num_masked"])
        generator.class_dropout = 0.5  # the harness's label drop, drawn from the same torch stream as MAR's
        torch.manual_seed(train["seed"])
        ours["training loss (label drop 0.5, 4 copies)"] = generator.train().loss(train["latents"],
                                                                                  train["labels"])["loss"]
        forget(generator)
        generator.eval()
    for name, orders in inputs["sampling_orders"].items():
        ours[f"sampled tokens: {name}"] = sampled(generator, fx, name, orders)
    assert set(ours) == set(official)  # every recorded official output is checked
    for name, theirs in official.items():
        assert (ours[name] - theirs).abs().max().item() <= tol[name], name
    # a fixture the mistakes it guards against fail: MAR's orders not reversed, or the other CFG schedule
    run_name = "cfg 3.0 constant, τ 0.9, 25 steps"
    theirs = official[f"sampled tokens: {run_name}"]
    unreversed = sampled(generator, fx, run_name, inputs["sampling_orders"][run_name].flip(1))
    linear = sampled(generator, fx, run_name, inputs["sampling_orders"][run_name], cfg_schedule="linear")
    assert (unreversed - theirs).abs().max() > 1e-2 and (linear - theirs).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- (b) end to end
def random_mar_state(*, seed: int = 0, **model) -> dict[str, torch.Tensor]:
    """A random-weight tiny MAR of 10 classes in MAR's layout (its names in its order)."""
    torch.manual_seed(seed)
    generator = MARGenerator(spec=KL16Tokenizer(**E2E_VAE).spec, num_classes=10, **{**E2E_MODEL, **model})
    return MARCheckpoints().generator_to_official(generator.state_dict(), {}, generator)


def test_import_cli_then_sample_and_eval_the_imported_run(tmp_path, capsys):
    gen_file = checkpoint_file(tmp_path, random_mar_state())
    run = tmp_path / "imported"
    done = run_import_cli(tmp_path, f"official={PRESET}", f"tokenizer_file={kl16_file(tmp_path, E2E_VAE)}",
                          f"generator_file={gen_file}", *E2E, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    assert f"imported official={PRESET}" in done.stdout and f"arvision-sample run={run}" in done.stdout
    record = json.loads((run / "results.json").read_text())
    imported = record["imported"]
    assert imported["family"] == "mar" and imported["preset"] == PRESET
    assert imported["files"]["tokenizer"]["layout"] == "model"
    assert imported["files"]["generator"]["layout"] == "model_ema"  # the EMA copy, as MAR evaluates
    assert imported["published"]["fid"] == 2.31 and "README" in imported["published"]["source"]
    sample = record["config"]["generator"]["sample"]  # the README's evaluation command
    assert {k: sample[k] for k in ("cfg", "num_iter", "num_sampling_steps", "temperature", "cfg_schedule",
                                   "remask", "clip_denoised")} == {
        "cfg": 2.9, "num_iter": 256, "num_sampling_steps": 100, "temperature": 1.0, "cfg_schedule": "linear",
        "remask": "random", "clip_denoised": 0.0}

    out = tmp_path / "samples.npz"
    fast = ["+sample.num_iter=4", "+sample.num_sampling_steps=5"]
    sample_cli.main.__wrapped__(compose_config("sample", [f"run={run}", "num_samples=10", "batch_size=5",
                                                          f"out={out}", *fast], tmp_path))
    assert capsys.readouterr().out.startswith(f"wrote {out}: 10 samples")
    npz = np.load(out)
    assert npz["arr_0"].shape == (10, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    evaluate_cli.main.__wrapped__(compose_config("eval", [
        f"run={run}", "metrics.num_samples=10", "metrics.num_reference=40", "metrics.batch_size=10",
        "metrics.latency_batch_size=null", "metrics.classifier.epochs=0.1", "select=[fid,accuracy]", *fast],
        tmp_path))
    evaluation = json.loads((run / "results.json").read_text())["evaluations"][-1]
    assert np.isfinite(evaluation["metrics"]["fid"]["value"]) and evaluation["metrics"]["fid"]["num_samples"] == 10
    assert 0.0 <= evaluation["metrics"]["accuracy"]["value"] <= 1.0


# --------------------------------------------------------------------------------------------- (c) round trip
@pytest.mark.parametrize("layout", ["training", "plain", "model only"])
def test_export_writes_the_official_file_back(layout, tmp_path):
    state = random_mar_state()
    gen_file = tmp_path / GENERATOR_FILE
    if layout == "training":
        gen_file = checkpoint_file(tmp_path, state)
    elif layout == "plain":
        torch.save(state, gen_file)
    else:  # a checkpoint saved without EMA weights
        torch.save({"model": state, "epoch": 3}, gen_file)
    run = do_import(tmp_path, (kl16_file(tmp_path, E2E_VAE), gen_file), E2E)
    assert torch.equal(run.generator.diffusion_pos_embed_learned, state["diffusion_pos_embed_learned"])
    written = export_official(tmp_path / "run", tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == ["kl16.ckpt",
                                                                             "mar_base/checkpoint-last.pth"]
    back = read_official(written[1])
    key = {"training": "model_ema", "plain": None, "model only": "model"}[layout]
    if key is not None:
        assert list(back) == [key]
        back = back[key]
    assert list(back) == list(state)  # MAR's names in MAR's order
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_ema_false_reads_the_training_weights(tmp_path):
    state = random_mar_state()
    files = (kl16_file(tmp_path, E2E_VAE), checkpoint_file(tmp_path, state))
    run = do_import(tmp_path, files, E2E, "ema=false")
    assert torch.equal(run.generator.fake_latent, state["fake_latent"] + 1.0)  # `model`: the EMA weights + 1


# --------------------------------------------------------------------------------------------- (d) wrong files
def test_a_file_of_another_size_is_named_in_one_line_and_nothing_is_written(tmp_path):
    tok = kl16_file(tmp_path, E2E_VAE)
    gen_file = checkpoint_file(tmp_path, random_mar_state(head_depth=3))  # a deeper DiffLoss MLP
    with pytest.raises(CheckpointMismatch) as err:
        do_import(tmp_path, (tok, gen_file), E2E)
    assert str(err.value) == (
        f"{gen_file} does not fit official={PRESET} (MARGenerator): 8 unexpected "
        "(diffloss.net.res_blocks.2.in_ln.weight, diffloss.net.res_blocks.2.in_ln.bias, "
        "diffloss.net.res_blocks.2.mlp.0.weight, … (8 in all)); is it the file of that model, or another size?")
    assert not (tmp_path / "run").exists()
    # another buffer size: the position tables say so, in MAR's names
    gen_file = checkpoint_file(tmp_path, random_mar_state(buffer_size=64))
    with pytest.raises(CheckpointMismatch, match=r"2 of another shape \(encoder_pos_embed_learned 1×128×32 in the "
                                                 r"file, 1×68×32 in the model"):
        do_import(tmp_path, (tok, gen_file), E2E)


# --------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset,params,head,cfg,generator_file", [
    ("mar_b", 207.9, (6, 1024), 2.9, "mar_base/checkpoint-last.pth"),
    ("mar_l", 478.3, (8, 1280), 3.0, "mar_large/checkpoint-last.pth"),
    ("mar_h", 942.4, (12, 1536), 3.2, "mar_huge/checkpoint-last.pth")])
def test_presets_build_the_released_models_with_the_readme_settings(preset, params, head, cfg, generator_file,
                                                                     tmp_path):
    """Parameter counts of the official builders (mar_base/large/huge with the README's diffloss_d/w;
    experiments/parity/mar.py checks every name and shape against them)."""
    config = compose_import([f"official={preset}"], tmp_path)
    with torch.device("meta"):
        tokenizer = instantiate(config.tokenizer.model, image_size=256, image_channels=3)
        generator = instantiate(config.generator.model)(spec=tokenizer.spec, num_classes=1000)
    assert round(sum(p.numel() for p in generator.parameters()) / 1e6, 1) == params
    assert tokenizer.spec.grid == (16, 16) and tokenizer.spec.dim == 16
    assert generator.buffer_size == 64 and generator.diffusion_batch_mul == 4
    assert (len(generator.diffloss.net.res_blocks), generator.diffloss.net.input_proj.out_features) == head
    assert (generator.order_kind, generator.attention_kind, generator.head_kind) == ("random", "bidirectional",
                                                                                     "diffusion")
    sample = OmegaConf.to_container(config.generator.sample)
    assert (sample["cfg"], sample["num_iter"], sample["num_sampling_steps"], sample["temperature"],
            sample["cfg_schedule"], sample["clip_denoised"]) == (cfg, 256, 100, 1.0, "linear", 0.0)
    assert config.official.files.generator == generator_file and config.official.files.tokenizer == "kl16.ckpt"
