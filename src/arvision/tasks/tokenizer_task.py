"""Stage 1: train a tokenizer (reconstruction + quantiser losses, optional LPIPS and PatchGAN).

Manual optimisation because the adversarial loss alternates generator and discriminator updates. Lightning
counts every optimiser step in `global_step`, so once the discriminator starts, a step of each counts twice;
`stage1_trainer_steps` gives the trainer's `max_steps` for a wanted number of tokenizer updates.
"""

from __future__ import annotations

import math

import torch

from arvision.tasks.errors import NonFiniteLoss
from arvision.tasks.optim import warmup_cosine
from arvision.tasks.resume import ResumableTask
from arvision.tokenizers.base import Tokenizer
from arvision.tokenizers.losses import (PatchDiscriminator, build_perceptual_loss, hinge_d_loss, hinge_g_loss,
                                        perceptual_loss)


def stage1_trainer_steps(max_steps: int, disc_weight: float, disc_start: int) -> int:
    return max_steps + (max(0, max_steps - disc_start) if disc_weight > 0 else 0)


class TokenizerTask(ResumableTask):
    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        max_steps: int = 1000,
        grad_clip: float = 1.0,
        perceptual_weight: float = 0.0,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        disc_width: int = 64,
        disc_layers: int = 3,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.tokenizer = tokenizer
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.max_steps, self.grad_clip = warmup_steps, max_steps, grad_clip
        self.disc_weight, self.disc_start = disc_weight, disc_start
        self.perceptual_weight = perceptual_weight
        # Frozen LPIPS is kept out of the state dict: it is not part of the tokenizer artifact.
        self._lpips = [build_perceptual_loss("vgg")] if perceptual_weight > 0 else [None]
        self.perceptual_active = self._lpips[0] is not None
        self.discriminator = (PatchDiscriminator(in_channels=tokenizer.spec.image_channels, width=disc_width,
                                                 num_layers=disc_layers) if disc_weight > 0 else None)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # tokenizer updates, resumable

    def completed_steps(self) -> int:
        return int(self.updates)

    def configure_optimizers(self):
        opt_g = torch.optim.AdamW(self.tokenizer.parameters(), lr=self.lr, betas=self.betas,
                                  weight_decay=self.weight_decay)
        optimizers = [opt_g]
        schedulers = [warmup_cosine(opt_g, warmup_steps=self.warmup_steps, max_steps=self.max_steps)]
        if self.discriminator is not None:
            opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=self.lr, betas=self.betas,
                                      weight_decay=self.weight_decay)
            optimizers.append(opt_d)
            schedulers.append(warmup_cosine(opt_d, warmup_steps=self.warmup_steps, max_steps=self.max_steps))
        return optimizers, schedulers

    def _check(self, loss: torch.Tensor) -> None:
        if not math.isfinite(loss.item()):
            raise NonFiniteLoss(f"stage-1 loss is {loss.item()} at step {int(self.updates)}; stopped (lower "
                                f"tokenizer.train.lr, which trains a new tokenizer artifact, or check the data)")

    def training_step(self, batch, batch_idx: int) -> None:
        images = batch[0]
        optimizers = self.optimizers()
        schedulers = self.lr_schedulers()
        opt_g = optimizers[0] if isinstance(optimizers, list) else optimizers
        sched_g = schedulers[0] if isinstance(schedulers, list) else schedulers
        gan_on = self.discriminator is not None and int(self.updates) >= self.disc_start

        out = self.tokenizer(images)
        loss = out["loss"]
        logs = {k: v.detach() for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0 and k != "loss"}
        lpips = self._lpips[0]
        if lpips is not None:
            lpips.to(images.device)
            p_loss = perceptual_loss(lpips, out["recon"], images)
            loss = loss + self.perceptual_weight * p_loss
            logs["perceptual_loss"] = p_loss.detach()
        if gan_on:
            g_loss = hinge_g_loss(self.discriminator(out["recon"]))
            loss = loss + self.disc_weight * g_loss
            logs["g_loss"] = g_loss.detach()
        self._check(loss)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(opt_g, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        sched_g.step()

        if gan_on:
            opt_d, sched_d = optimizers[1], schedulers[1]
            d_loss = hinge_d_loss(self.discriminator(images), self.discriminator(out["recon"].detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            sched_d.step()
            logs["d_loss"] = d_loss.detach()
        self.updates += 1
        self.log_dict({f"stage1/{k}": v for k, v in logs.items()}, prog_bar=False, sync_dist=False)
        self.log("stage1/loss", loss.detach(), prog_bar=True)
