"""Optimiser and schedule set-up shared by both stages."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only, never on norms, biases or gains (LlamaGen / nanoGPT), nor on
    what the module lists in `no_weight_decay()` (timm's convention; VAR's positions, level table, attention scales)."""
    skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(module: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    fused = any(p.is_cuda for p in module.parameters())  # fused kernels exist for CUDA tensors
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=tuple(betas), fused=fused or None)


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int,
                  min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to `min_lr_ratio`·lr at `max_steps` (constant after)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
