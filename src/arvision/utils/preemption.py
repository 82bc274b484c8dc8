"""Pre-emption and time limits on SLURM: save at a step boundary, re-queue, resume exactly.

`hydra/launcher=slurm` asks SLURM for SIGUSR1 `signal_delay_s` seconds before the time limit (sbatch
`--signal=USR1@<s>`; a pre-emption that is announced the same way behaves alike). `RequeueOnSignal` (in
`callbacks=default`) then lets the step in flight finish, writes `step=N.ckpt` and points `last.ckpt` at it in the
stage's checkpoint folder, runs `scontrol requeue <job>` on rank 0 and stops the process. SLURM starts the job again:
submitit re-runs the same pickled Hydra job, which composes the same config into the same run directory (the
launcher's `${now:}` values travel with the pickle), and arvision-train resumes from `last.ckpt` as from any
checkpoint: same data order, RNG and EMA, the same weights as an uninterrupted run.

Why not the two built-in paths:
- Lightning's `SLURMEnvironment(auto_requeue=True)` saves from inside the signal handler, that is in the middle of
  whatever the step is doing (between the optimiser update and the EMA update or the step counter, say), to
  `hpc_ckpt_<n>.ckpt`, a file arvision's resume does not read; and it installs its handler only when no other is
  there, so under submitit it may never run at all. This callback replaces it for the training loop.
- submitit's own path (SIGUSR2: `checkpoint()` then `scontrol requeue`) saves nothing: the job restarts from the
  newest periodic checkpoint and repeats up to `checkpoint_every` steps. The slurm preset sends SIGUSR1 instead, so
  it is not used (its `max_num_timeout` has no effect; SLURM's own requeue limit applies).

With several processes every rank gets the signal, possibly at different steps: the ranks agree (any rank) at each
step's end before saving, so all of them save and stop at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType

import lightning as L

log = logging.getLogger("arvision")


class Preempted(SystemExit):
    """The run saved a checkpoint on the pre-emption signal and stopped (re-queued when under SLURM)."""


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array task (a Hydra sweep), else the job's."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(job_id: str) -> bool:
    """`scontrol requeue <job_id>`; True when it succeeded (a failure is logged: the checkpoint is written anyway)."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("scontrol requeue %s failed (%s); resubmit the job to resume", job_id, err)
        return False
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed (exit %d: %s); resubmit the job to resume", job_id, done.returncode,
                    done.stderr.strip())
        return False
    log.info("re-queued SLURM job %s", job_id)
    return True


def link_last(ckpt_dir: Path, name: str) -> None:
    """Point `last.ckpt` at `name` atomically (it is the old link or the new one, never missing)."""
    tmp = ckpt_dir / ".last.ckpt.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    os.replace(tmp, ckpt_dir / "last.ckpt")


class RequeueOnSignal(L.Callback):
    """On `signal_name` during training: finish the step, save `step=N.ckpt` + `last.ckpt`, re-queue, stop."""

    def __init__(self, *, signal_name: str = "SIGUSR1", requeue: bool = True) -> None:
        if signal_name not in signal.Signals.__members__:
            raise ValueError(f"callbacks.requeue.signal_name={signal_name!r} is not a signal name (e.g. SIGUSR1)")
        self.signum = signal.Signals[signal_name]
        self.requeue = requeue
        self.received = False
        self._previous: signal.Handlers | None = None

    def _note(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the handler may run in the middle of an optimiser update.
        self.received = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = False
        if threading.current_thread() is threading.main_thread():
            # After Lightning registered its own handlers (Trainer._run), so this one replaces its SLURM requeue.
            self._previous = signal.signal(self.signum, self._note)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous)
        self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: the optimiser step (and a consistent checkpoint) comes after more micro-batches
        stop = self.received
        if trainer.world_size > 1:  # every rank stops at the same step, whichever saw the signal
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        checkpoint = trainer.checkpoint_callback
        ckpt_dir = Path(checkpoint.dirpath if checkpoint is not None and checkpoint.dirpath
                        else trainer.default_root_dir)
        name = f"step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(ckpt_dir / name)  # every rank takes part; rank 0 writes
        job = slurm_job_id()
        if trainer.is_global_zero:
            link_last(ckpt_dir, name)
            queued = self.requeue and job is not None and requeue(job)
        else:
            queued = False
        what = f"SLURM job {job} re-queued" if queued else "rerun the same command to resume"
        raise Preempted(f"arvision: {signal.Signals(self.signum).name} received: saved {ckpt_dir / name} at step "
                        f"{trainer.global_step}; {what}")
