"""Which device a command runs on (`device=auto|cpu|cuda|cuda:N`), and how it is described in results."""

from __future__ import annotations

import platform
from typing import Any

import torch


class DeviceError(ValueError):
    """A device that is not valid or not present on this machine; one line that says what to use instead."""


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA GPU when one is visible, else the CPU; `cpu`, `cuda` and `cuda:N` are taken as
    given and checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device={name} needs a CUDA GPU and none is visible; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def device_info(device: torch.device) -> dict[str, Any]:
    """The device as results record it: type, name, and the GPU count (CUDA) or the thread count (CPU)."""
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count()}
    return {"type": device.type, "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}


def device_name(device: torch.device) -> str:
    """One line for tables: the GPU's name, or `cpu (<processor>, N threads)`."""
    info = device_info(device)
    if device.type == "cuda":
        return info["name"]
    return f"{info['type']} ({info['name']}, {info['threads']} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU has nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["DeviceError", "device_info", "device_name", "resolve_device", "synchronize"]
