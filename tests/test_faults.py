"""The fault matrix: real `arvision-train` processes killed by real signals at every kind of point of both stages,
then rerun into the same run directory; every resumed run ends with the uninterrupted run's weights and metrics.

The kill is injected by tests/fault_injection/sitecustomize.py (on PYTHONPATH for the killed process only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, cli_env

MAX_STEPS, EVERY = 12, 3  # checkpoints at steps 3, 6, 9, 12 of both stages
FAULTS = [  # (stage, point, step): before the first checkpoint, before half, after half, during a write, evaluation
    (stage, point, step) for stage in ("1", "2")
    for point, step in (("step", 1), ("step", 4), ("step", 8), ("write", 6), ("eval", 0))
]


def train(root: Path, run: str, kill: str | None = None) -> subprocess.CompletedProcess:
    env = cli_env(root)
    if kill:
        env.update(ARVISION_TEST_KILL=kill,
                   PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "fault_injection"), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "arvision.cli.train", "debug=tiny", "data=shapes", "logger=none",
                           f"tokenizer.train.max_steps={MAX_STEPS}", f"generator.train.max_steps={MAX_STEPS}",
                           f"checkpoint_every={EVERY}", f"hydra.run.dir={root / run}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def outcome(root: Path, run: str) -> tuple[dict, dict, dict]:
    results = json.loads((root / run / "results.json").read_text())
    weights = torch.load(root / run / "generator.pt", weights_only=True)
    tokenizer = torch.load(Path(results["tokenizer_artifact"]) / "tokenizer.pt", weights_only=True)["state_dict"]
    return results, weights, tokenizer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict, dict]:
    root = tmp_path_factory.mktemp("straight")
    done = train(root, "run")
    assert done.returncode == 0, done.stderr[-3000:]
    return outcome(root, "run")


# SIGKILL everywhere; SIGTERM (what SLURM sends before it kills a pre-empted job) everywhere but mid-write: during
# fit Lightning's handler defers it to the end of the step, so it cannot land inside a checkpoint write.
CASES = [(*fault, "SIGKILL") for fault in FAULTS] + [(*fault, "SIGTERM") for fault in FAULTS if fault[1] != "write"]
# The default selection kills each stage before half-way, after half-way and mid-write, and each signal in both
# stages (about 12 s a case); the other cases are slow-marked and run by .ci/run.
DEFAULT = {("1", "step", 4, "SIGKILL"), ("1", "write", 6, "SIGKILL"), ("1", "eval", 0, "SIGTERM"),
           ("2", "step", 1, "SIGKILL"), ("2", "step", 8, "SIGTERM"), ("2", "write", 6, "SIGKILL")}


@pytest.mark.parametrize("stage, point, step, signame", [
    pytest.param(*case, id=f"stage{case[0]}-{case[1]}{case[2] or ''}-{case[3]}",
                 marks=() if case in DEFAULT else pytest.mark.slow) for case in CASES])
def test_a_killed_run_resumes_to_the_uninterrupted_result(stage, point, step, signame, uninterrupted, tmp_path):
    killed = train(tmp_path, "run", kill=f"{stage}:{point}:{step}:{signame}")
    assert killed.returncode != 0 or not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "results.json").exists()  # a killed run never looks finished
    resumed = train(tmp_path, "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results, weights, tokenizer = outcome(tmp_path, "run")
    expected_results, expected_weights, expected_tokenizer = uninterrupted
    for key, value in expected_tokenizer.items():
        assert torch.equal(tokenizer[key], value), f"tokenizer {key}"
    for part in ("generator", "ema"):
        for key, value in expected_weights[part].items():
            assert torch.equal(weights[part][key], value), f"{part} {key}"
    got, want = results["metrics"]["generator"], expected_results["metrics"]["generator"]
    for name in ("fid", "precision", "recall", "accuracy", "test_loss"):
        assert got[name]["value"] == want[name]["value"], name
