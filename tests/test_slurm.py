"""SLURM without SLURM: the launcher presets render the sbatch script they promise, and a run that receives the
pre-emption signal (SIGUSR1) mid-training saves at the step's end, re-queues itself through `scontrol` (a PATH shim
that records its arguments), stops, and the re-queued invocation resumes to the uninterrupted run's weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from arvision.cli.common import config_dir
from tests.conftest import REPO, cli_env

MAX_STEPS = 8
SLURM_ENV = {  # an array task of a submitit sweep, as SLURM describes it to each task (Lightning detects SLURM)
    "SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "7", "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
}


def shim(folder: Path, name: str, log: Path) -> None:
    """An executable `name` on PATH that appends its arguments to `log` and succeeds."""
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
    (folder / name).chmod(0o755)


def sbatch_script(launcher: str, *overrides: str, tmp_path: Path) -> str:
    """The sbatch script submitit writes for the composed hydra/launcher preset (as the launcher maps it)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # arvision[dev], as tests/test_sweeps.py
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra/launcher={launcher}", *overrides],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    params.pop("submitit_folder")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    queue_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in queue_keys else f"slurm_{key}": value for key, value in params.items()})
    return executor._executor._make_submission_file_text("python -m arvision", "uid")


def test_slurm_preset_asks_for_usr1_before_the_limit_and_allows_requeue(tmp_path, monkeypatch):
    shim(tmp_path / "bin", "srun", tmp_path / "calls.log")  # submitit's SLURM executor looks for srun
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    script = sbatch_script("slurm", "trainer=ddp", "trainer.devices=4", "hydra.launcher.partition=gpu",
                           "hydra.launcher.account=proj", "hydra.launcher.timeout_min=600", tmp_path=tmp_path)
    for line in ("--signal=USR1@120", "--requeue", "--partition=gpu", "--account=proj", "--time=600",
                 "--gpus-per-node=4", "--ntasks-per-node=4", "--nodes=1", "--open-mode=append"):
        assert f"#SBATCH {line}\n" in script, line
    assert "USR2" not in script and "--exclusive" not in script


def test_multinode_preset_takes_nodes_and_gpus_from_the_recipe(tmp_path, monkeypatch):
    shim(tmp_path / "bin", "srun", tmp_path / "calls.log")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    script = sbatch_script("slurm_multinode", "experiment=imagenet/flowar_s", "data.root=/data",
                           "hydra.launcher.signal_delay_s=300", tmp_path=tmp_path)
    for line in ("--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=8", "--exclusive", "--signal=USR1@300",
                 "--requeue"):
        assert f"#SBATCH {line}\n" in script, line


def train(root: Path, run: str, *, signal_at: int | None = None, stage: int = 2) -> subprocess.CompletedProcess:
    """arvision-train (tiny shapes run, checkpoints only at the end) as SLURM task 4242_7, `scontrol` shimmed."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**cli_env(root), **SLURM_ENV, "PATH": f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    shim(root / "bin", "scontrol", root / "scontrol.log")
    if signal_at is not None:  # tests/fault_injection sends the signal entering that step
        env.update(ARVISION_TEST_KILL=f"{stage}:step:{signal_at}:SIGUSR1",
                   PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "fault_injection"), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "arvision.cli.train", "debug=tiny", "data=shapes", "logger=none",
                           "callbacks=default", "trainer.enable_progress_bar=false", "evaluate=false",
                           f"tokenizer.train.max_steps={MAX_STEPS}", f"generator.train.max_steps={MAX_STEPS}",
                           "checkpoint_every=1000", f"hydra.run.dir={root / run}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "generator.pt", weights_only=True)


def assert_same_weights(got: dict, want: dict) -> None:
    for part in ("generator", "ema"):
        assert got[part].keys() == want[part].keys()
        for key, value in want[part].items():
            assert torch.equal(got[part][key], value), f"{part} {key}"


def test_sigusr1_in_process_saves_at_the_step_end_requeues_and_the_rerun_resumes_there(tmp_path, monkeypatch):
    """The same path inside one process (seconds): the subprocess test below is the real thing, slow-marked."""
    from arvision import pipeline
    from arvision.tasks import GeneratorTask
    from arvision.utils.preemption import Preempted
    from tests.conftest import compose_train

    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    shim(tmp_path / "bin", "scontrol", tmp_path / "scontrol.log")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_train(["debug=tiny", "data=shapes", "logger=none", "callbacks=default",
                         "trainer.enable_progress_bar=false", "evaluate=false",
                         f"generator.train.max_steps={MAX_STEPS}", "checkpoint_every=1000"], tmp_path)
    pipeline.run(cfg, tmp_path / "straight")

    original, seen = GeneratorTask.training_step, []

    def step(self, batch, batch_idx):
        seen.append(self.completed_steps())
        if self.completed_steps() == 3 and len(seen) == 4:  # only in the first run
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(GeneratorTask, "training_step", step)
    before = signal.getsignal(signal.SIGUSR1)
    saved = "SIGUSR1 received: saved .*step=4.ckpt at step 4; SLURM job 4242_7 re-queued"
    with pytest.raises(Preempted, match=saved):
        pipeline.run(cfg, tmp_path / "preempted")
    assert (tmp_path / "scontrol.log").read_text() == "scontrol requeue 4242_7\n"
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is the training loop's only
    assert not (tmp_path / "preempted" / "generator.pt").exists()
    seen.clear()
    pipeline.run(cfg, tmp_path / "preempted")
    assert seen == list(range(4, MAX_STEPS))  # resumed after the saved step
    assert_same_weights(weights(tmp_path / "preempted"), weights(tmp_path / "straight"))


@pytest.mark.slow
def test_sigusr1_saves_requeues_and_the_requeued_run_ends_with_the_uninterrupted_weights(tmp_path):
    straight = train(tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert not (tmp_path / "scontrol.log").exists()  # no signal, no requeue

    preempted = train(tmp_path, "preempted", signal_at=3)
    ckpt_dir = tmp_path / "preempted" / "checkpoints" / "generator"
    assert preempted.returncode != 0 and not (tmp_path / "preempted" / "generator.pt").exists()
    assert "SIGUSR1 received" in preempted.stderr and "SLURM job 4242_7 re-queued" in preempted.stderr
    # The step in flight finished (the signal came entering step 3): saved after 4 steps, though checkpoint_every
    # is 1000, and last.ckpt points at it; Lightning's own SLURM handler (hpc_ckpt_*.ckpt) did not run.
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step=4.ckpt"]
    assert os.readlink(ckpt_dir / "last.ckpt") == "step=4.ckpt"
    assert (tmp_path / "scontrol.log").read_text() == "scontrol requeue 4242_7\n"

    requeued = train(tmp_path, "preempted")  # SLURM re-runs the same job: the same command into the same run dir
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {ckpt_dir / 'last.ckpt'}" in requeued.stdout + requeued.stderr
    assert_same_weights(weights(tmp_path / "preempted"), weights(tmp_path / "straight"))


@pytest.mark.slow
def test_sigusr1_during_stage_1_resumes_the_tokenizer_exactly(tmp_path):
    straight = train(tmp_path / "a", "run")
    assert straight.returncode == 0, straight.stderr[-3000:]
    preempted = train(tmp_path / "b", "run", signal_at=2, stage=1)
    assert preempted.returncode != 0 and "re-queued" in preempted.stderr
    requeued = train(tmp_path / "b", "run")
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "b" / "run"), weights(tmp_path / "a" / "run"))


@pytest.mark.slow
def test_a_rerun_of_the_pickled_submitit_job_resumes_in_its_run_directory(tmp_path):
    """What SLURM does on `scontrol requeue`: run the job's script again, i.e. `python -m submitit.core._submit` on
    the job's folder, which unpickles the same Hydra job. Here the submitit local executor (no SLURM to re-queue
    with: the signal only saves and stops) and the re-run by hand with the environment submitit gives a job."""
    env = cli_env(tmp_path)
    overrides = ["debug=tiny", "data=shapes", "logger=none", "callbacks=default", "trainer.enable_progress_bar=false",
                 "evaluate=false", f"generator.train.max_steps={MAX_STEPS}", "checkpoint_every=1000"]
    straight = subprocess.run([sys.executable, "-m", "arvision.cli.train", *overrides,
                               f"hydra.run.dir={tmp_path / 'straight'}"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    kill = {"ARVISION_TEST_KILL": "2:step:3:SIGUSR1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "fault_injection"), env.get("PYTHONPATH", "")])}
    sweep = subprocess.run([sys.executable, "-m", "arvision.cli.train", "-m", "hydra/launcher=submitit_local",
                            *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env={**env, **kill},
                           capture_output=True, text=True, timeout=300)
    assert sweep.returncode != 0
    (job_dir,) = [p for p in (tmp_path / "sweep").iterdir() if p.name.startswith("0_")]
    assert os.readlink(job_dir / "checkpoints" / "generator" / "last.ckpt") == "step=4.ckpt"
    (folder,) = [p for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.name != "%j"]
    job = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": folder.name, "SUBMITIT_LOCAL_NTASKS": "1",
           "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "0",
           "SUBMITIT_LOCAL_LOCALID": "0"}
    rerun = subprocess.run([sys.executable, "-m", "submitit.core._submit", str(folder)], cwd=tmp_path,
                           env={**env, **job}, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (job_dir / "results.json").exists()  # the same run directory, finished
    assert_same_weights(weights(job_dir), weights(tmp_path / "straight"))
