"""Stage 2: train a generator on pre-encoded tokens of the frozen tokenizer, with an EMA of its weights
(`ema_decay=None`: none, sampling uses the trained weights, as VAR and LlamaGen train).

The learning rate follows `lr_schedule` (tasks/optim.py `lr_factor`: cosine, constant, linear, wsd) and the weight
decay `weight_decay_at` (constant, or VAR's ramp to `weight_decay_end`), both pure functions of the step.

`compile=True` (the config's `train.compile`) runs the generator's `loss` through `torch.compile` (the forward
and, by AOTAutograd, its backward); the parameters, the optimiser, the checkpoint keys, the EMA copy and sampling
are untouched and stay eager. It is built on the first training step and never pickled (spawned DDP ranks build
their own). Random draws inside the loss (dropout, timesteps, noise) come from Inductor's own generator, so a
compiled run follows a different random stream than an eager one (`torch._inductor.config.fallback_random=True`
restores eager's, as the equivalence test does).

`shard` (trainer=fsdp, Lightning's ModelParallelStrategy) shards the generator and its EMA copy with FSDP2 in
`configure_model`, once the processes and their device mesh exist (`arvision.tasks.sharding`).
"""

from __future__ import annotations

import math

import torch

from arvision.generators.base import Generator
from arvision.tasks.ema import EMA
from arvision.tasks.errors import NonFiniteLoss
from arvision.tasks.optim import adamw, lr_schedule, weight_decay_at
from arvision.tasks.resume import ResumableTask
from arvision.tasks.sharding import ShardSettings, shard_generator


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
        ema_decay: float | None = 0.999,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
        decay_fraction: float = 0.15,
        warmup_start: float | None = None,
        weight_decay_end: float | None = None,
        compile: bool = False,
        shard: ShardSettings | None = None,
    ) -> None:
        super().__init__()
        self.generator = generator
        self.ema = None if ema_decay is None else EMA(generator, decay=ema_decay)
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.schedule = dict(schedule=lr_schedule, min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction,
                             warmup_start=warmup_start)
        self.weight_decay_end = weight_decay_end
        self.compile = compile
        self._compiled_loss = None
        self.shard = shard
        self.sharded = False

    def configure_model(self) -> None:
        # Lightning calls this in every process once the device mesh exists (ModelParallelStrategy), and again on
        # each later fit of the same task: shard once.
        if self.shard is None or self.sharded:
            return
        ema = None if self.ema is None else self.ema.module
        shard_generator(self.generator, ema, self.device_mesh["data_parallel"], self.shard)
        self.sharded = True

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
        sched = lr_schedule(opt, warmup_steps=self.warmup_steps, max_steps=self.max_steps, **self.schedule)
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

    def optimizer_step(self, epoch, batch_idx, optimizer, *args, **kwargs) -> None:
        if self.weight_decay_end is not None:  # this step's rate on the decayed group (param_groups: [decayed, not])
            optimizer.param_groups[0]["weight_decay"] = weight_decay_at(
                self.global_step, start=self.weight_decay, end=self.weight_decay_end, max_steps=self.max_steps)
        super().optimizer_step(epoch, batch_idx, optimizer, *args, **kwargs)
        # Here rather than in on_train_batch_end: callbacks (the checkpoint) run before that hook.
        if self.ema is not None:
            self.ema.update(self.generator)

    def sampler(self) -> Generator:
        """The generator used for sampling and evaluation: the EMA weights, or the trained ones without an EMA."""
        return self.generator if self.ema is None else self.ema.module
