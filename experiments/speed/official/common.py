"""Timing protocol shared by the official-code harnesses, the same as `arvision.bench` uses for ours.

Each harness (var.py, llamagen.py, flowar.py, acdit.py) builds the official model from a checkout given on the
command line, with random weights, and times it as the official H200 figures were taken:
- training: the official train step (forward, loss, backward, optimiser step) on a batch of random inputs,
  warm-up steps excluded, median of the timed steps → img/s;
- sampling: the official sampling function on a batch, a warm-up batch excluded, median of the repeats → img/s.
Every timed region ends with a device synchronisation. The official code is never copied into this repository:
`--repo` points at a checkout that is not under version control (on the GPU machine: the git-ignored `.official/`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from arvision.bench import timed  # needs src/ on PYTHONPATH (gpu_suite.py sets it) or arvision installed


def parse_args(description: str, presets: list[str],
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The shared flags; `extra` adds a harness's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repo", required=True, type=Path, help="checkout of the official code (kept outside)")
    parser.add_argument("--preset", choices=presets, default=presets[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model: checks the harness, times nothing real")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--train-warmup", type=int, default=5)
    parser.add_argument("--train-repeats", type=int, default=20)
    parser.add_argument("--sample-warmup", type=int, default=1)
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-sample", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


@contextlib.contextmanager
def official_imports(repo: Path) -> Iterator[None]:
    """Puts the checkout first on sys.path (its packages are called `models`, `utils`, … like many others)."""
    if not repo.is_dir():
        raise SystemExit(f"official checkout not found: {repo} (pass --repo <dir of a clone of the official code>)")
    sys.path.insert(0, str(repo.resolve()))
    try:
        yield
    finally:
        sys.path.remove(str(repo.resolve()))


def median_seconds(fn: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device) -> float:
    """arvision-bench's own timer (each call ends with a device synchronisation), so both sides are timed alike."""
    return statistics.median(timed(fn, warmup=warmup, repeats=repeats, device=device))


def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` (None: off, fp32 tensors)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def gpu_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The official reduced precision on CUDA; None (fp32, no autocast) on a CPU, where bf16 and fp16 crawl without
    AMX and the GPU setting is not what a CPU runs."""
    return dtype if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def report(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """Adds provenance, prints one line per phase and writes the JSON."""
    device = torch.device(args.device)
    result = {"official": True, "device": device_name(device), "torch": torch.__version__,
              "tiny": args.tiny, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}
    for phase in ("train", "sample"):
        if phase in result:
            r = result[phase]
            print(f"{result['model']} official {phase}: {r['img_per_s']:.1f} img/s "
                  f"(batch {r['batch_size']}, {r['precision']}, peak {r.get('peak_memory_mib') or 0:.0f} MiB)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result
