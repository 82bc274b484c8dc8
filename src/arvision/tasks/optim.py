"""Optimiser and schedule set-up shared by both stages."""

from __future__ import annotations

import functools
import math
from collections.abc import Collection

import torch
from torch import nn

from arvision.generators.base import Generator


def param_groups(module: nn.Module, weight_decay: float, *, skip: Collection[str] = ()) -> list[dict]:
    """Weight decay on matrices and conv kernels only, never on norms, biases or gains (LlamaGen / nanoGPT), nor on
    the parameters named in `skip` (a generator's `no_weight_decay()`: VAR's positions, level table, scales)."""
    skip = set(skip)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(generator: Generator, *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over a generator's parameters, without decay where `param_groups` and `no_weight_decay()` say."""
    fused = any(p.is_cuda for p in generator.parameters())  # fused kernels exist for CUDA tensors
    groups = param_groups(generator, weight_decay, skip=generator.no_weight_decay())
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


SCHEDULES = ("cosine", "constant", "linear", "wsd")


def lr_factor(step: int, *, schedule: str = "cosine", warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1,
              decay_fraction: float = 0.15, warmup_start: float | None = None) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of the peak: a pure function of the step,
    so a resumed run gets the same rate as an uninterrupted one.

    Warm-up: `warmup_start` None ramps (step + 1) / warmup_steps; a number r ramps r + (1 − r)·step / warmup_steps
    (VAR's wp0 = 0.005; MAR, FlowAR and ACDiT start from 0). After it (W = warmup_steps, T = max_steps, m =
    min_lr_ratio, f = decay_fraction):
    - cosine: half-cosine from 1 to m over steps W … T, then m (MAR/FlowAR util/lr_sched.py with min_lr = m·lr);
    - constant: 1 (LlamaGen train_c2i.py; MAR --lr_schedule constant);
    - linear: VAR's lin schedules (utils/lr_control.py): with p = (step − W) / (T − 1 − W), 1 while p < 1 − f,
      then linear from 1 down to m at the last step (VAR's 'lin0' is f = 0.95, m = --wpe);
    - wsd: warm-up, stable, then the last f of the steps after the warm-up decay exponentially from 1 towards m,
      m ** ((step − D) / (T − D)) from D = W + int((1 − f)·(T − W)) (ACDiT train.py lambda_wsd: m = 0.5^6).
    """
    if step < warmup_steps:
        if warmup_start is None:
            return (step + 1) / warmup_steps
        return warmup_start + (1 - warmup_start) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps))
        if progress < 1 - decay_fraction:
            return 1.0
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress) / decay_fraction
    if schedule == "wsd":
        decay_start = warmup_steps + int((1 - decay_fraction) * (max_steps - warmup_steps))
        if step < decay_start:
            return 1.0
        return min_lr_ratio ** min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def weight_decay_at(step: int, *, start: float, end: float | None, max_steps: int) -> float:
    """The weight decay of optimizer step `step`: `start` throughout when `end` is None, else a half-cosine from
    `start` at step 0 to `end` at the last step (VAR utils/lr_control.py: over the whole run, warm-up included)."""
    if end is None:
        return start
    progress = min(1.0, step / max(1, max_steps - 1))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int, schedule: str = "cosine",
                min_lr_ratio: float = 0.1, decay_fraction: float = 0.15,
                warmup_start: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler following `lr_factor` (Lightning steps it after each optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, schedule=schedule, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio,
        decay_fraction=decay_fraction, warmup_start=warmup_start))


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int,
                  min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to `min_lr_ratio`·lr at `max_steps` (constant after)."""
    return lr_schedule(optimizer, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio)
