"""Shared fixtures: configs composed exactly as `arvision-train` composes them, with paths in a tmp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from arvision.cli.common import config_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tiny models spend most of their time in thread hand-offs; one thread is faster and steadier here.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def compose_train(overrides: list[str], root: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.paths.output_dir = str(root / "run")
        cfg.paths.artifact_dir = str(root / "artifacts")
        cfg.paths.data_dir = str(root / "data")
        cfg.paths.log_dir = str(root / "outputs")
    return cfg


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
