"""Sweeps at scale, exercised locally: a 2-job sweep through the submitit launcher (the SLURM code path on this
machine) and a 2-trial Optuna search whose objective is the generator FID that arvision-train returns."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from arvision.results import SCHEMA_VERSION
from tests.conftest import cli_env

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


def _train(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arvision.cli.train", *args], cwd=tmp_path, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=240)


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    done = _train(tmp_path, "-m", "hydra/launcher=submitit_local", "debug=tiny", "data=shapes",
                  "train_generator=false", "evaluate=false", "tokenizer.model.vocab_size=16,32")
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    results = sorted(sweep.rglob("results.json"))
    assert len(results) == 2
    sizes = sorted(json.loads(p.read_text())["spec"]["vocab_size"] for p in results)
    assert sizes == [16, 32]
    # The jobs went through submitit: its pickled jobs and per-job logs are there.
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2


def test_joblib_launcher_runs_the_sweep_jobs_in_parallel_processes(tmp_path):
    # make demo's launcher: two jobs at once, each in its own worker process, sharing the artifact cache.
    long_tag = "t" * 300  # an override value longer than a file name may be
    done = _train(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "debug=tiny", "data=shapes",
                  "train_generator=false", "evaluate=false", "tokenizer.model.vocab_size=16,32", f"tags=[{long_tag}]")
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    # job folders are the job number and a hash of its overrides (resolved in the worker processes too)
    assert all(re.fullmatch(r"[01]_[0-9a-f]{8}", job.name) for job in sweep.iterdir() if job.is_dir()
               and not job.name.startswith("."))
    assert len([job for job in sweep.iterdir() if re.fullmatch(r"[01]_[0-9a-f]{8}", job.name)]) == 2
    results = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert sorted(r["spec"]["vocab_size"] for r in results) == [16, 32]
    # each job's record: the current schema, and the overrides that rerun that job alone
    assert {r["schema_version"] for r in results} == {SCHEMA_VERSION}
    for r in results:
        assert f"tokenizer.model.vocab_size={r['spec']['vocab_size']}" in r["overrides"] and "debug=tiny" in r[
            "overrides"]
    launchers = {yaml.safe_load(p.read_text())["hydra"]["launcher"]["_target_"] for p in sweep.rglob("hydra.yaml")}
    assert launchers == {"hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}


def test_optuna_sweeper_minimises_the_generator_fid(tmp_path):
    done = _train(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "debug=tiny", "data=shapes")
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    trials = [json.loads(p.read_text()) for p in sorted(sweep.rglob("results.json"))]
    assert len(trials) == 2
    fids = [t["metrics"]["generator"]["fid"]["value"] for t in trials]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(fids))
    assert set(best["best_params"]) == {"generator.train.lr", "generator.train.weight_decay", "generator.sample.cfg"}
    best_trial = trials[fids.index(min(fids))]["config"]
    assert best_trial["generator"]["train"]["lr"] == pytest.approx(best["best_params"]["generator.train.lr"])
