"""Shared fixtures: configs composed exactly as `arvision-train` composes them, with paths in a tmp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from arvision.cli.common import config_dir

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist, what `make data` installs


def needs_fashion_mnist() -> None:
    """Skip a test that reads the dataset the demo uses when it is not installed, except in CI (CI set), where
    its absence means `make data` failed and must fail the run instead of hiding behind skips."""
    if FASHION_MNIST.is_dir():
        return
    message = "Fashion-MNIST is not installed (make data: apt-get install dataset-fashion-mnist)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI runs the tests on the data the demo uses")
    pytest.skip(message)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tiny models spend most of their time in thread hand-offs; one thread is faster and steadier here.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def compose_config(name: str, overrides: list[str], root: Path) -> DictConfig:
    """conf/<name>.yaml with every path rooted in `root` (a test's tmp_path)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.output_dir = str(root / "run")
        cfg.paths.artifact_dir = str(root / "artifacts")
        cfg.paths.data_dir = str(root / "data")
        cfg.paths.log_dir = str(root / "outputs")
    return cfg


def compose_train(overrides: list[str], root: Path) -> DictConfig:
    return compose_config("train", overrides, root)


def compose_import(overrides: list[str], root: Path) -> DictConfig:
    """conf/import.yaml (arvision-import), e.g. ["official=var_d16", "tokenizer_file=…", …]."""
    return compose_config("import", overrides, root)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A factory: tiny shapes config rooted in tmp_path (extra overrides may be given)."""
    def make(*overrides: str, root: Path | None = None) -> DictConfig:
        return compose_train(["debug=tiny", "data=shapes", "logger=csv", *overrides], root or tmp_path)
    return make


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ARVISION_ROOT=str(tmp_path), ARVISION_ARTIFACTS=str(tmp_path / "artifacts"), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    return env


def run_import_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`arvision-import <args>` in a fresh process rooted in tmp_path (its stdout, stderr and exit status)."""
    return subprocess.run([sys.executable, "-m", "arvision.cli.imports", *args], capture_output=True, text=True,
                          env=cli_env(tmp_path), cwd=tmp_path, timeout=300)


def untrained_test_loss(cfg: DictConfig, results: dict) -> float:
    """The held-out loss of a run's generator at its initial weights (the seed's, on the run's tokenizer artifact,
    the same test images and seeded noise): what a trained generator's `test_loss` must beat."""
    from arvision import evaluation, pipeline  # Lightning: only for the tests that train

    cfg = pipeline.finalize_config(cfg)
    dm = pipeline.build_datamodule(cfg)
    tokenizer = pipeline.load_tokenizer(Path(results["tokenizer_artifact"]))
    torch.manual_seed(cfg.seed)
    generator = pipeline.build_generator(cfg, tokenizer, dm.num_classes).eval()
    m = cfg.metrics
    return evaluation.test_loss(generator, dm, num_images=min(m.num_reference, len(dm.test_set)),
                                batch_size=m.batch_size, seed=m.seed, device=torch.device("cpu"))


def untrained_psnr(cfg: DictConfig) -> float:
    """Mean PSNR of decode(encode(x)) on the test images a run evaluates, with the tokenizer's initial weights:
    what a trained tokenizer's `psnr` must beat."""
    from arvision import pipeline
    from arvision.metrics import psnr

    cfg = pipeline.finalize_config(cfg)
    dm = pipeline.build_datamodule(cfg)
    torch.manual_seed(cfg.seed)
    tokenizer = pipeline.build_tokenizer(cfg, dm).eval()
    images = dm.reference_images(min(cfg.metrics.num_reference, len(dm.test_set)))[0].float() / 127.5 - 1
    with torch.no_grad():
        return psnr(tokenizer.decode(tokenizer.encode(images)), images).mean().item()


def run_crashing_at(monkeypatch, cfg: DictConfig, run_dir: Path, step: int, *, stage: int = 2) -> None:
    """`pipeline.run` that crashes when training of `stage` reaches `step` (its checkpoints so far stay, as after a
    kill); the training step is restored afterwards, so a rerun resumes normally."""
    from arvision import pipeline
    from arvision.tasks import GeneratorTask, TokenizerTask

    task = GeneratorTask if stage == 2 else TokenizerTask
    original = task.training_step

    def crash(self, batch, batch_idx):
        if self.completed_steps() == step:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(task, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(cfg, run_dir)
    monkeypatch.setattr(task, "training_step", original)

