"""Optimiser and schedule set-up shared by both stages."""

from __future__ import annotations

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


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int,
                  min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to `min_lr_ratio`·lr at `max_steps` (constant after)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
