"""What both stages need to resume bit-for-bit: the RNG state and the sampler's position."""

from __future__ import annotations

import lightning as L
import torch

from arvision.data.tokens import StepSampler


class ResumableTask(L.LightningModule):
    def completed_steps(self) -> int:
        return self.global_step

    def on_train_epoch_start(self) -> None:
        # The step sampler resumes where the checkpoint stopped instead of replaying the first batches.
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        if isinstance(sampler, StepSampler):
            sampler.start_step = self.completed_steps()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()  # dropout / label dropout continue identically

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
