"""Exponential moving average of a module's weights, kept as a frozen copy inside the task.

Being a submodule of the LightningModule, the average is checkpointed and restored with the run, so a
resumed run continues the same average. Only the generator is averaged, never the frozen tokenizer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, *, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        self.decay = decay
        self.warmup = warmup  # decay ramps as min(decay, (1 + n) / (10 + n)) so early averages are not stale
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = self.decay
        if self.warmup:
            n = float(self.num_updates)
            decay = min(decay, (1.0 + n) / (10.0 + n))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(self.module.buffers(), model.buffers()):
            ema_buf.copy_(buf)

    def forward(self, *args, **kwargs):  # pragma: no cover - use .module
        return self.module(*args, **kwargs)
