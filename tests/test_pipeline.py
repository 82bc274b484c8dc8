"""The whole run end to end on tiny configs: artifacts, outputs, resume, errors, export, CLI, DDP."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from arvision import pipeline
from arvision.cli import evaluate as evaluate_cli
from arvision.cli import sample as sample_cli
from arvision.cli.common import config_dir
from arvision.export import export
from arvision.generators.base import IncompatibleTokenizer
from arvision.reevaluate import reevaluate
from arvision.results import SCHEMA_VERSION
from arvision.tasks import GeneratorTask, NonFiniteLoss, TokenizerTask
from arvision.tokenizers.base import TokenSpec, Tokenizer
from tests.conftest import REPO, cli_env, compose_train, run_crashing_at, untrained_psnr, untrained_test_loss


def test_tiny_run_writes_results_with_provenance(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    run = tmp_path / "run"
    results = pipeline.run(cfg, run)
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["metrics"] == json.loads(json.dumps(results["metrics"]))
    assert on_disk["schema_version"] == SCHEMA_VERSION
    gen, tok = results["metrics"]["generator"], results["metrics"]["tokenizer"]
    for name in ("fid", "is", "kid", "precision", "recall", "accuracy"):
        assert gen[name]["extractor"] == "classifier" and gen[name]["num_samples"] == cfg.metrics.num_samples
        assert np.isfinite(gen[name]["value"])
    assert gen["nfe_per_image"] == 64
    # six training steps already lower the held-out loss well below that of the initial weights (≈ ln 32)
    assert gen["test_loss"]["value"] < untrained_test_loss(cfg, results) - 0.05
    assert gen["sampling_cost"] == {"passes": 64, "backbone_passes": 64, "head_passes": 0, "rows_per_pass_factor": 2}
    assert gen["sample_img_per_s"]["value"] > 0 and gen["params"] > 0
    assert gen["latency_img_per_s"]["value"] > 0 and gen["latency_img_per_s"]["batch_size"] == 1  # small-batch regime
    assert 0 < tok["usage"]["value"] <= 1 and tok["psnr"]["value"] > untrained_psnr(cfg) + 1.0
    assert on_disk["spec"]["grid"] == [8, 8]
    assert results["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert on_disk["config"]["generator"]["name"] == "raster" and "classifier_test_accuracy" in \
        on_disk["feature_extractor"]
    for name in ("samples.png", "reconstructions.png", "samples.npz", "generator.pt"):
        assert (run / name).exists(), name
    npz = np.load(run / "samples.npz")
    assert npz["arr_0"].shape == (cfg.metrics.num_samples, 32, 32, 1) and npz["arr_0"].dtype == np.uint8
    stages = results["costs"]["stage_seconds"]  # every stage timed, and together within the run's wall-clock
    assert set(stages) == {"setup", "feature_extractor", "tokenizer_train", "tokenizer_eval", "encode",
                           "generator_train", "reference_stats", "generator_sampling", "generator_metrics",
                           "generator_test_loss", "generator_latency", "generator_eval"}
    assert all(s >= 0 for s in stages.values()) and sum(stages.values()) <= results["costs"]["total_seconds"] + 1e-3
    assert stages["generator_train"] >= results["costs"]["stage2_seconds"]


def test_second_run_reuses_the_tokenizer_artifact(tiny_cfg, tmp_path, monkeypatch):
    pipeline.run(tiny_cfg(), tmp_path / "a")
    artifacts = list((tmp_path / "artifacts" / "tokenizer").iterdir())
    monkeypatch.setattr(pipeline, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer trained twice"))
    cfg = tiny_cfg("generator.model.depth=1")  # a different generator, the same tokenizer
    results = pipeline.run(cfg, tmp_path / "b")
    assert list((tmp_path / "artifacts" / "tokenizer").iterdir()) == artifacts
    assert Path(results["tokenizer_artifact"]).name in {p.name for p in artifacts}


def test_incompatible_pair_fails_before_any_training(tiny_cfg, tmp_path, monkeypatch):
    class ContinuousStub(Tokenizer):
        def __init__(self):
            super().__init__()
            self.spec = TokenSpec(name="vae", kind="continuous", layout="grid", grid=(8, 8), dim=4)

    monkeypatch.setattr(pipeline, "build_tokenizer", lambda cfg, dm: ContinuousStub())
    monkeypatch.setattr(pipeline, "train_tokenizer", lambda *a, **k: pytest.fail("trained before checking the pair"))
    with pytest.raises(IncompatibleTokenizer, match=r"raster needs .*tokenizer=vq.*got tokenizer=vae"):
        pipeline.run(tiny_cfg(), tmp_path / "run")
    assert not (tmp_path / "artifacts" / "tokenizer").exists()


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "generator.pt", weights_only=True)


@pytest.mark.parametrize("checkpoint_every, crash_at", [(4, 6), (2, 3)])  # killed after and before half-way
def test_killed_run_resumes_to_the_same_weights(checkpoint_every, crash_at, tiny_cfg, tmp_path, monkeypatch):
    overrides = ("generator.train.max_steps=8", f"checkpoint_every={checkpoint_every}", "evaluate=false")
    pipeline.run(tiny_cfg(*overrides), tmp_path / "straight")

    run_crashing_at(monkeypatch, tiny_cfg(*overrides), tmp_path / "resumed", crash_at)
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "generator" / "last.ckpt", weights_only=True)
    kept = crash_at - crash_at % checkpoint_every  # the last checkpoint before the crash
    assert saved["global_step"] == kept
    assert not (tmp_path / "resumed" / "generator.pt").exists()
    resumed = pipeline.run(tiny_cfg(*overrides), tmp_path / "resumed")  # same run dir: resumes from `kept`
    stage2 = resumed["costs"]
    assert stage2["stage2_img_per_s"] == pytest.approx((8 - kept) * 16 / stage2["stage2_seconds"])  # steps it ran

    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    for part in ("generator", "ema"):
        for key in a[part]:
            assert torch.allclose(a[part][key], b[part][key], atol=1e-6), (part, key)
    # And the resumed run really continued: its weights differ from the checkpoint it resumed from.
    at_kept = {k.removeprefix("generator."): v for k, v in saved["state_dict"].items() if k.startswith("generator.")}
    assert at_kept.keys() == b["generator"].keys()
    assert any(not torch.allclose(at_kept[key], value, atol=1e-6) for key, value in b["generator"].items())
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "generator" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8


def test_stage1_killed_before_half_way_resumes_to_the_same_tokenizer(tiny_cfg, tmp_path, monkeypatch):
    overrides = ("tokenizer.train.max_steps=8", "checkpoint_every=2", "train_generator=false", "evaluate=false")
    pipeline.run(tiny_cfg(*overrides, root=tmp_path / "straight"), tmp_path / "straight" / "run")
    run_crashing_at(monkeypatch, tiny_cfg(*overrides, root=tmp_path / "resumed"), tmp_path / "resumed" / "run", 3,
                    stage=1)
    pipeline.run(tiny_cfg(*overrides, root=tmp_path / "resumed"), tmp_path / "resumed" / "run")

    (straight,), (resumed,) = ((tmp_path / run / "artifacts" / "tokenizer").glob("*/tokenizer.pt")
                               for run in ("straight", "resumed"))
    assert resumed.parent.name == straight.parent.name  # the same artifact key
    meta = json.loads((resumed.parent / "meta.json").read_text())
    assert (meta["train_steps"], meta["train_steps_timed"]) == (8, 6)  # resumed from step 2, ran the other 6
    a, b = (torch.load(path, weights_only=True)["state_dict"] for path in (straight, resumed))
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def poison_loss(monkeypatch, *, at_step: int, value: float):
    """From stage-2 step `at_step` on, the generator's loss is `value`; returns the unpatched training step."""
    original = GeneratorTask.training_step

    def poisoned(self, batch, batch_idx):
        if self.global_step == at_step:
            monkeypatch.setattr(self.generator, "loss", lambda *a: {"loss": torch.tensor(value)})
        return original(self, batch, batch_idx)

    monkeypatch.setattr(GeneratorTask, "training_step", poisoned)
    return original


def test_a_kill_that_left_no_last_checkpoint_link_resumes_from_the_newest_step_file(tiny_cfg, tmp_path,
                                                                                    monkeypatch):
    overrides = ("generator.train.max_steps=8", "checkpoint_every=2", "evaluate=false")
    pipeline.run(tiny_cfg(*overrides), tmp_path / "straight")
    run_crashing_at(monkeypatch, tiny_cfg(*overrides), tmp_path / "resumed", 5)
    (tmp_path / "resumed" / "checkpoints" / "generator" / "last.ckpt").unlink()  # killed between unlink and link
    resumed = pipeline.run(tiny_cfg(*overrides), tmp_path / "resumed")
    assert resumed["costs"]["stage2_img_per_s"] == pytest.approx(4 * 16 / resumed["costs"]["stage2_seconds"])
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    assert all(torch.allclose(a["generator"][k], b["generator"][k], atol=1e-6) for k in a["generator"])


@pytest.mark.parametrize("checkpoint_every, kept", [(3, 3), (2, 2)])  # (2, 2): the step-4 weights gave the NaN
def test_nan_loss_stops_and_keeps_the_last_checkpoint_from_before_it(checkpoint_every, kept, tiny_cfg, tmp_path,
                                                                     monkeypatch):
    poison_loss(monkeypatch, at_step=4, value=float("nan"))
    with pytest.raises(NonFiniteLoss, match=r"nan at step 4") as err:
        pipeline.run(tiny_cfg("generator.train.max_steps=8", f"checkpoint_every={checkpoint_every}"), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "generator" / "last.ckpt"
    assert "\n" not in str(err.value) and f"ckpt_path={last}" in str(err.value)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == kept
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert sorted(p.name for p in last.parent.glob("step=*.ckpt")) == [f"step={kept}.ckpt"]  # none from step 4 on


def test_after_a_nan_stop_a_new_run_continues_from_the_kept_checkpoint_with_its_own_lr(tiny_cfg, tmp_path,
                                                                                        monkeypatch):
    overrides = ("generator.train.max_steps=8", "checkpoint_every=2", "evaluate=false")
    original = poison_loss(monkeypatch, at_step=5, value=float("inf"))
    with pytest.raises(NonFiniteLoss, match=r"inf at step 5"):
        pipeline.run(tiny_cfg(*overrides), tmp_path / "a")
    monkeypatch.setattr(GeneratorTask, "training_step", original)
    source = tmp_path / "a" / "checkpoints" / "generator" / "last.ckpt"
    # as the message says: a new run directory, other settings, ckpt_path= the kept checkpoint (step 4)
    pipeline.run(tiny_cfg(*overrides, "generator.train.lr=1e-4", f"ckpt_path={source}"), tmp_path / "b")
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "generator" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8
    assert set(ckpt["lr_schedulers"][0]["base_lrs"]) == {1e-4}  # not the 2e-3 the stopped run was trained with
    assert all(group["initial_lr"] == 1e-4 for group in ckpt["optimizer_states"][0]["param_groups"])


def sample_config(run: Path, *overrides: str) -> DictConfig:
    """arvision-sample's config as its command line composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="sample", overrides=[f"run={run}", *overrides])


def compose_eval(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


def test_sample_export_is_adm_layout_class_balanced_and_takes_sampling_overrides(tiny_cfg, tmp_path, capsys):
    pipeline.run(tiny_cfg("evaluate=false"), tmp_path / "run")
    cfg = sample_config(tmp_path / "run", "num_samples=12", f"out={tmp_path / 's.npz'}", "batch_size=5", "seed=3",
                        "+sample.cfg=1.5")
    exported = export(cfg)
    npz = np.load(exported.path)
    assert npz["arr_0"].shape == (12, 32, 32, 1) and npz["arr_0"].dtype == np.uint8
    assert np.bincount(npz["labels"], minlength=4).tolist() == [3, 3, 3, 3]
    assert "'cfg': 1.5" in exported.message and "'temperature': 0.9" in exported.message  # override + run's own
    again = np.load(export(cfg).path)
    assert np.array_equal(again["arr_0"], npz["arr_0"])  # seeded
    sample_cli.main.__wrapped__(cfg)  # the CLI prints the export's line (its img/s is measured anew)
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {exported.path}: 12 samples, ") and printed.count("\n") == 1
    assert printed.rstrip().endswith(exported.message.split(" img/s")[1])


def test_sample_export_resizes_as_llamagen_scores_its_384_px_models(tiny_cfg, tmp_path, monkeypatch):
    """image_size=N: bicubic on the decoded images before the clamp (LlamaGen's sample_c2i_ddp.py order), then the
    usual uint8 rounding: the same bytes as resizing the unclamped decoder output by hand."""
    import arvision.evaluation as evaluation

    pipeline.run(tiny_cfg("evaluate=false"), tmp_path / "run")
    decoded = []
    cfg = sample_config(tmp_path / "run", "num_samples=8", f"out={tmp_path / 'small.npz'}", "image_size=20")
    run = pipeline.load_run(tmp_path / "run")
    decode = type(run.tokenizer).decode
    # 3× the decoder's output: values past ±1, where resizing before or after the clamp differ
    def scaled(self, tokens):
        decoded.append(3 * decode(self, tokens))
        return decoded[-1]
    monkeypatch.setattr(type(run.tokenizer), "decode", scaled)
    small = np.load(export(cfg).path)["arr_0"]
    assert small.shape == (8, 20, 20, 1) and small.dtype == np.uint8
    full = torch.cat(decoded[1:])  # the first decode is the untimed warm-up batch
    assert full.abs().max() > 1
    by_hand = torch.nn.functional.interpolate(full, size=(20, 20), mode="bicubic").clamp(-1, 1)
    assert np.array_equal(small, evaluation.to_uint8(by_hand))
    clamped_first = torch.nn.functional.interpolate(full.clamp(-1, 1), size=(20, 20), mode="bicubic").clamp(-1, 1)
    assert not np.array_equal(small, evaluation.to_uint8(clamped_first))  # the order shows in the bytes
    with pytest.raises(pipeline.ConfigError, match=r"^image_size=0: must be an integer ≥ 1"):
        export(sample_config(tmp_path / "run", "image_size=0"))


@pytest.mark.parametrize("bad", ["num_samples=0", "num_samples=-5", "batch_size=0"])
def test_sample_export_refuses_a_bad_count_before_any_work(bad, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load_run", lambda *a, **k: pytest.fail("loaded the run before checking"))
    with pytest.raises(pipeline.ConfigError, match=r"^(num_samples|batch_size)=-?\d+: must be an integer ≥ 1$"):
        export(sample_config(tmp_path / "run", bad))
    assert not list(tmp_path.rglob("*.npz"))


def test_a_sampling_override_the_generator_lacks_fails_before_any_work(tiny_cfg, tmp_path, monkeypatch, capsys):
    pipeline.run(tiny_cfg("evaluate=false"), tmp_path / "run")
    settings = ", ".join(json.loads((tmp_path / "run" / "results.json").read_text())
                         ["config"]["generator"]["sample"])
    expected = f"sample.cgf is not a sampling setting of generator=raster; its settings: {settings}"
    monkeypatch.setattr(pipeline, "load_tokenizer", lambda *a, **k: pytest.fail("weights read before the check"))
    cfg = sample_config(tmp_path / "run", "+sample.cgf=1.5")
    with pytest.raises(pipeline.ConfigError) as err:
        export(cfg)
    assert str(err.value) == expected and settings.startswith("cfg, temperature, top_k, top_p")
    eval_cfg = compose_eval(f"run={tmp_path / 'run'}", "+sample.cgf=1.5", "+sample.cfg=1.0")
    with pytest.raises(pipeline.ConfigError, match=r"^sample\.cgf is not a sampling setting of generator=raster"):
        reevaluate(eval_cfg)
    for main, config in ((sample_cli.main, cfg), (evaluate_cli.main, eval_cfg)):  # the CLIs: that one line
        with pytest.raises(SystemExit):
            main.__wrapped__(config)
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("arvision:")]
        assert errors == [f"arvision: error: {expected}"]  # one line (library warnings may precede it)


def test_missing_dataset_is_one_line_that_says_how_to_get_it(tmp_path, monkeypatch):
    import arvision.data.datasets as datasets
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "nowhere")
    cfg = compose_train(["debug=tiny"], tmp_path)  # no data.root, and nothing installed
    with pytest.raises(FileNotFoundError) as err:
        pipeline.build_datamodule(cfg)
    message = str(err.value)
    assert "\n" not in message and "dataset-fashion-mnist" in message and "data.root" in message \
        and "data.download=true" in message


def test_cli_sweep_shares_the_tokenizer_and_tables_the_runs(tmp_path):
    env = cli_env(tmp_path)
    done = subprocess.run([sys.executable, "-m", "arvision.cli.train", "-m", "debug=tiny", "data=shapes",
                           "generator.model.depth=1,2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("│ accuracy") == 2 and "FID" in done.stdout
    results = sorted((tmp_path / "outputs" / "train" / "multiruns").rglob("results.json"))
    assert len(results) == 2
    artifacts = {json.loads(p.read_text())["tokenizer_artifact"] for p in results}
    assert len(artifacts) == 1  # trained once, reused by the second job
    assert len(list((tmp_path / "artifacts" / "tokenizer").glob("*/meta.json"))) == 1
    table = subprocess.run([sys.executable, "-m", "arvision.cli.table", str(tmp_path / "outputs"), "--format",
                            "csv"], env=env, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and table.stdout.count("vq,raster") == 2


def test_cli_user_errors_are_one_line_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "arvision.cli.train", "debug=tiny", "data=imagefolder",
                           f"data.root={tmp_path / 'missing'}", "data.num_classes=2"], cwd=tmp_path,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    error = [line for line in done.stderr.splitlines() if line.startswith("arvision: error:")]
    assert len(error) == 1 and "missing" in error[0] and "Traceback" not in done.stderr


def test_ddp_two_processes_on_cpu_train_as_one_process_on_the_global_batch(tiny_cfg, tmp_path):
    """Two DDP ranks take the same steps as one process on the same global batch of 16 (8 images each): every rank
    reads its slice of the same seeded batch and the gradients are averaged. Class dropout is off, so the two
    differ in nothing random; the single-process run goes first and leaves the tokenizer artifact both use."""
    same = ("generator.model.class_dropout=0.0",)
    single = pipeline.run(tiny_cfg(*same, "generator.train.batch_size=16", "evaluate=false"), tmp_path / "single")
    env = cli_env(tmp_path)
    done = subprocess.run([sys.executable, "-m", "arvision.cli.train", "debug=tiny", "data=shapes", "trainer=ddp_sim",
                           *same, "generator.train.batch_size=16"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["trainer"]["devices"] == 2 and results["config"]["trainer"]["strategy"] == "ddp_spawn"
    costs, steps = results["costs"], results["config"]["generator"]["train"]["max_steps"]
    assert costs["stage2_img_per_s"] == pytest.approx(steps * 16 / costs["stage2_seconds"])  # both ranks' images
    assert results["tokenizer_artifact"] == single["tokenizer_artifact"]
    assert results["metrics"]["generator"]["test_loss"]["value"] < untrained_test_loss(tiny_cfg(*same), results) - 0.05
    ddp, one = _final_weights(run), _final_weights(tmp_path / "single")
    for part in ("generator", "ema"):
        assert ddp[part].keys() == one[part].keys()
        for key in one[part]:
            torch.testing.assert_close(ddp[part][key], one[part][key], rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")


def test_continuous_tokenizer_artifact_stores_a_calibrated_scaling_factor(tiny_cfg, tmp_path):
    cfg = tiny_cfg("tokenizer=vae", "train_generator=false", "evaluate=false")
    results = pipeline.run(cfg, tmp_path / "run")
    artifact = Path(results["tokenizer_artifact"])
    meta = json.loads((artifact / "meta.json").read_text())
    tokenizer = pipeline.load_tokenizer(artifact)
    assert meta["scaling_factor"] > 0 and float(tokenizer.scaling_factor) == pytest.approx(meta["scaling_factor"])
    dm = pipeline.build_datamodule(cfg)
    images = torch.stack([dm.train_set[i][0] for i in range(64)])
    assert tokenizer.encode(images).std().item() == pytest.approx(1.0, abs=0.25)


@pytest.mark.parametrize("tokenizer", ["rvq", "msvq", "vae", "lfq"])
def test_every_tokenizer_trains_and_is_evaluated_through_stage_1(tokenizer, tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"tokenizer={tokenizer}", "train_generator=false")
    results = pipeline.run(cfg, tmp_path / "run")
    tok = results["metrics"]["tokenizer"]
    # six steps already reconstruct the test images better than the initial weights do (by 2–3 dB)
    assert tok["psnr"]["value"] > untrained_psnr(cfg) + 1.0 and np.isfinite(tok["rfid"]["value"])
    assert ("usage" in tok) == (results["spec"]["kind"] == "discrete")
    parts = {"rvq": results["spec"]["depth"], "msvq": len(results["spec"]["scales"])}.get(tokenizer, 0)
    per_part = [k for k in tok if k.startswith("usage_")]
    assert len(per_part) == parts and all(0 < tok[k]["value"] <= 1 for k in per_part)
    assert (tmp_path / "run" / "reconstructions.png").exists()


@pytest.mark.parametrize("depth_mode, shared", [("flatten", True), ("head", True), ("flatten", False)])
def test_rvq_tokens_train_the_raster_generator_in_both_depth_modes(depth_mode, shared, tiny_cfg, tmp_path):
    cfg = tiny_cfg("tokenizer=rvq", "tokenizer.model.depth=2", f"tokenizer.model.shared_codebook={shared}",
                   f"generator.model.depth_mode={depth_mode}")
    results = pipeline.run(cfg, tmp_path / "run")
    assert results["metrics"]["generator"]["test_loss"]["value"] < untrained_test_loss(cfg, results) - 0.05
    assert results["spec"]["layout"] == "depth" and results["spec"]["depth"] == 2
    assert results["spec"]["shared_codebook"] is shared
    # flattened: one pass per code; depth head: one spatial pass per position + one head pass per code
    expected = 8 * 8 * 2 if depth_mode == "flatten" else 8 * 8 + 8 * 8 * 2
    assert results["metrics"]["generator"]["nfe_per_image"] == expected
    assert np.load(tmp_path / "run" / "samples.npz")["arr_0"].shape[1:] == (32, 32, 1)


# --------------------------------------------------------------------------------------------- cli/ stays thin
CLI = REPO / "src" / "arvision" / "cli"
HELPER_MAX_LINES = 25  # a cli helper declares arguments or formats; anything longer is library work
WORK_MODULES = {"torch", "lightning", "numpy"}  # a cli module that needs these is doing the work itself


def _imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "arvision.cli":  # `from arvision.cli import sample`
                names |= {f"arvision.cli.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("path", sorted(CLI.glob("*.py")), ids=lambda p: p.name)
def test_cli_modules_parse_call_and_print_only(path):
    """Each entry point parses, calls one library function and prints: no cli module imports another (common
    aside), defines a class, loops, reaches for torch/lightning/numpy or has a helper longer than a few lines."""
    tree = ast.parse(path.read_text())
    imported = _imported_modules(tree)
    assert {m for m in imported if m.startswith("arvision.cli.")} <= {"arvision.cli.common"}, path.name
    assert not {m.split(".")[0] for m in imported} & WORK_MODULES, path.name
    if path.name in ("__init__.py", "common.py"):
        return
    assert not [n.name for n in tree.body if isinstance(n, ast.ClassDef)], path.name
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While, ast.comprehension))], path.name
    functions = {n.name: n.end_lineno - n.lineno + 1 for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "main" in functions, path.name
    assert all(lines <= HELPER_MAX_LINES for name, lines in functions.items() if name != "main"), functions


@pytest.mark.parametrize("body", [
    "from arvision.cli.sample import load_run\n",      # a library function kept in another cli module
    "import lightning as L\n",                          # training in the entry point
    "class EvalError(ValueError):\n    pass\n",        # a library error defined in cli/
    "def rows(entry):\n    return [k for k in entry]\n",  # a loop over results
    "def train(cfg):\n" + "    x = 1\n" * 30,          # a long helper: the run itself
])
def test_the_thin_cli_check_catches_orchestration(body, tmp_path):
    fat = tmp_path / "fat.py"
    fat.write_text(body + "\n\ndef main():\n    pass\n")
    with pytest.raises(AssertionError):
        test_cli_modules_parse_call_and_print_only(fat)


def test_a_finished_run_is_never_trained_again(tiny_cfg, tmp_path):
    pipeline.run(tiny_cfg("evaluate=false"), tmp_path / "run")
    before = (tmp_path / "run" / "results.json").read_text()
    with pytest.raises(pipeline.ConfigError, match=r"holds a finished run .* arvision-eval run=.* new hydra.run.dir"):
        pipeline.run(tiny_cfg("evaluate=false", "generator.train.lr=1e-4"), tmp_path / "run")
    assert (tmp_path / "run" / "results.json").read_text() == before  # its record and history are untouched


def test_an_unfinished_run_resumes_only_with_its_own_settings(tiny_cfg, tmp_path, monkeypatch):
    overrides = ("generator.train.max_steps=8", "checkpoint_every=2", "evaluate=false")
    run_crashing_at(monkeypatch, tiny_cfg(*overrides), tmp_path / "run", 3)
    checkpoint = tmp_path / "run" / "checkpoints" / "generator" / "last.ckpt"
    saved = checkpoint.read_bytes()
    changed = (*overrides, "generator.train.lr=1e-4", "generator.model.depth=3")
    with pytest.raises(pipeline.ConfigError) as err:
        pipeline.run(tiny_cfg(*changed), tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and "generator.train.lr: 0.002 → 0.0001" in message
    assert "generator.model.depth: 2 → 3" in message and "overwrite=true" in message
    assert checkpoint.read_bytes() == saved  # refused before any work: the checkpoint is kept
    # overwrite=true discards it: the run trains from scratch with the new settings, as a fresh directory would
    fresh = pipeline.run(tiny_cfg(*changed), tmp_path / "fresh")
    again = pipeline.run(tiny_cfg(*changed, "overwrite=true"), tmp_path / "run")
    assert again["costs"]["stage2_seconds"] > 0
    a, b = _final_weights(tmp_path / "fresh"), _final_weights(tmp_path / "run")
    assert all(torch.equal(a["generator"][k], b["generator"][k]) for k in a["generator"])
    assert fresh["config"]["generator"]["train"]["lr"] == again["config"]["generator"]["train"]["lr"] == 1e-4
