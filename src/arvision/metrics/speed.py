"""Cost metrics: the one timing function every speed number goes through, peak memory and parameter counts."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from arvision.utils.device import synchronize


def timed(fn: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device,
          warmup_fn: Callable[[], Any] | None = None) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after `warmup` untimed calls.

    The warm-up calls are `warmup_fn` when given (a cheaper call on the same path, e.g. a small batch, when `fn`
    does a different piece of work each call) and `fn` otherwise. Each timed call ends with a device
    synchronisation, so queued GPU work is counted in full.
    """
    for _ in range(warmup):
        (warmup_fn or fn)()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict[str, Any]) -> Iterator[None]:
    """Records the block's peak memory in MiB: out['peak_memory_mib'] on CUDA (the allocator's peak during the
    block), out['peak_rss_mib'] on the CPU (the process's peak RSS so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once), optionally only those with requires_grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["count_parameters", "peak_memory", "timed"]
