"""Stage 2: train a generator on pre-encoded tokens of the frozen tokenizer, with an EMA of its weights.

`compile=True` (the config's `train.compile`) runs the generator's `loss` through `torch.compile` (the forward
and, by AOTAutograd, its backward); the parameters, the optimiser, the checkpoint keys, the EMA copy and sampling
are untouched and stay eager. It is built on the first training step and never pickled (spawned DDP ranks build
their own). Random draws inside the loss (dropout, timesteps, noise) come from Inductor's own generator, so a
compiled run follows a different random stream than an eager one (`torch._inductor.config.fallback_random=True`
restores eager's, as the equivalence test does).
"""

from __future__ import annotations

import math

import torch

from arvision.generators.base import Generator
from arvision.tasks.ema import EMA
from arvision.tasks.errors import NonFiniteLoss
from arvision.tasks.optim import adamw, warmup_cosine
from arvision.tasks.resume import ResumableTask


class GeneratorTask(ResumableTask):
    def __init__(
        self,
        *,
        generator: Generator,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        max_steps: int = 1000,
        ema_decay: float = 0.999,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.generator = generator
        self.ema = EMA(generator, decay=ema_decay)
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.compile = compile
        self._compiled_loss = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_compiled_loss"] = None  # a compiled callable does not pickle; it is rebuilt on first use
        return state

    def loss_fn(self):
        """The generator's `loss`, compiled once on first use when `compile` is set."""
        if not self.compile:
            return self.generator.loss
        if self._compiled_loss is None:
            self._compiled_loss = torch.compile(self.generator.loss)
        return self._compiled_loss

    def configure_optimizers(self):
        opt = adamw(self.generator, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        sched = warmup_cosine(opt, warmup_steps=self.warmup_steps, max_steps=self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        self.generator.set_progress(step=self.global_step, total_steps=self.max_steps)
        out = self.loss_fn()(tokens, labels)
        loss = out["loss"]
        if not math.isfinite(loss.item()):
            raise NonFiniteLoss(f"stage-2 loss is {loss.item()} at step {self.global_step}; stopped (lower "
                                f"generator.train.lr or check the tokens)")
        self.log_dict({f"stage2/{k}": v.detach() for k, v in out.items() if k != "loss"})
        self.log("stage2/loss", loss.detach(), prog_bar=True)
        return loss

    def on_train_start(self) -> None:
        # Continuing another run's checkpoint (ckpt_path=) with another learning rate: the restored optimiser and
        # schedule carry the old one, and this run's setting wins. Resuming a run with its own settings changes nothing.
        scheduler = self.lr_schedulers()
        if list(scheduler.base_lrs) != [self.lr] * len(scheduler.base_lrs):
            scheduler.base_lrs = [self.lr] * len(scheduler.base_lrs)
            for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
                group["initial_lr"] = self.lr
                group["lr"] = self.lr * factor(scheduler.last_epoch)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: callbacks (the checkpoint) run before that hook.
        self.ema.update(self.generator)

    def sampler(self) -> Generator:
        """The generator used for sampling and evaluation: the EMA weights."""
        return self.ema.module
