"""`results.json`: everything a table or notebook needs to know about one run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
PACKAGES = ("arvision", "torch", "torchvision", "lightning", "hydra-core", "torchmetrics", "torch-fidelity", "einops")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
    os.replace(tmp, path)


def read_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {RESULTS_FILE} in {run_dir}: is it a finished arvision run directory?")
    return json.loads(path.read_text())


def metric(value: float, *, extractor: str | None = None, num_samples: int | None = None,
           **extra: Any) -> dict[str, Any]:
    """One metric with its provenance (which features, how many samples)."""
    entry: dict[str, Any] = {"value": value}
    if extractor is not None:
        entry["extractor"] = extractor
    if num_samples is not None:
        entry["num_samples"] = num_samples
    entry.update(extra)
    return entry


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
