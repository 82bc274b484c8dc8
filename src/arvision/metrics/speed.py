"""Cost metrics: wall-clock throughput of a callable and parameter counts."""

from __future__ import annotations

import platform
import time
from typing import Any, Callable

import torch
from torch import nn


def measure_throughput(fn: Callable[[], Any], *, num_images: int, warmup: int = 1, repeats: int = 1) -> dict:
    """Time `repeats` calls of `fn`, each producing `num_images` images, after `warmup` untimed calls.

    Returns `img_per_s`, `seconds` (mean per call), `device` ("cuda" or "cpu"), `device_name`, `num_images`,
    `repeats` and `peak_memory_mb` (peak CUDA memory allocated during the timed calls; None on CPU). CUDA is
    synchronised around the timed region so that queued kernels are counted.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "img_per_s": num_images * repeats / elapsed,
        "seconds": elapsed / repeats,
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "num_images": num_images,
        "repeats": repeats,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once), optionally only those with requires_grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["count_parameters", "measure_throughput"]
