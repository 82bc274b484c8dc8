"""What both stages need to resume bit-for-bit: the RNG state and the number of completed steps.

The step sampler (`arvision.data.tokens.StepSampler`) makes batch `s` a pure function of (seed, s), so a run
resumed at step k is handed the batches k, k+1, … that an uninterrupted run would have seen.
"""

from __future__ import annotations

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
