"""What both stages need to resume bit-for-bit: the RNG state and the number of completed steps.

The step sampler (`arvision.data.tokens.StepSampler`) makes batch `s` a pure function of (seed, s), so a run
resumed at step k is handed the batches k, k+1, … that an uninterrupted run would have seen. Checkpoints are
`step=N.ckpt` (the two newest) with `last.ckpt` linking to the newest; `latest_checkpoint` finds where to resume
and `roll_back` drops the checkpoints a divergence made.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch

from arvision.utils.files import load_weights


class ResumableTask(L.LightningModule):
    def completed_steps(self) -> int:
        return self.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()  # dropout / label dropout continue identically
        checkpoint["completed_steps"] = self.completed_steps()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


def completed_steps(ckpt_path: str | Path) -> int:
    checkpoint = load_weights(ckpt_path, mmap=True)
    return int(checkpoint.get("completed_steps", checkpoint["global_step"]))


def _step_of(path: Path) -> int:
    return int(path.stem.removeprefix("step="))


def latest_checkpoint(ckpt_dir: Path) -> Path:
    """last.ckpt, or the newest step=N.ckpt when it is missing: a kill between Lightning removing the old link and
    making the new one must not lose the run."""
    last = ckpt_dir / "last.ckpt"
    steps = sorted(ckpt_dir.glob("step=*.ckpt"), key=_step_of)
    return last if last.exists() or not steps else steps[-1]


def roll_back(ckpt_dir: Path, bad_step: int) -> str:
    """After a non-finite loss at trainer step `bad_step` (computed with the weights saved at that step, if any):
    drop the checkpoints from that step on and point last.ckpt at the newest one before it; says what is kept."""
    kept = None
    for path in sorted(ckpt_dir.glob("step=*.ckpt"), key=_step_of):
        if _step_of(path) >= bad_step:
            path.unlink()
        else:
            kept = path
    last = ckpt_dir / "last.ckpt"
    if kept is None:
        last.unlink(missing_ok=True)
        return "no checkpoint from before it is kept, so a rerun starts from scratch"
    tmp = ckpt_dir / ".last.ckpt.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(kept.name)
    os.replace(tmp, last)  # atomic: last.ckpt is the old link or the new one, never missing
    return f"{last} now links to {kept.name}, the last checkpoint before the divergence"
