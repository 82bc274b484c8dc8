"""What every parity script shares: official checkout imports, the comparison rows, the CSV and the fixtures.

Each family script (`var.py`, `llamagen.py`, …) builds the official model from a checkout given with `--repo`, with
seeded random weights, writes its files in the official layout, imports them with arvision-import's code, runs the
same inputs through both, and records one row per output: the largest absolute difference and its tolerance.

    python experiments/parity/var.py --repo <VAR checkout>                  # tiny and published sizes → parity.csv
    python experiments/parity/var.py --repo <VAR checkout> --fixture        # also (re)write the golden fixture

`parity.csv` keeps every family's rows (a script replaces its own); experiments/parity/README.md renders it.
The fixture (`tests/fixtures/parity/<family>.pt`) holds the tiny official-layout state dicts, the inputs and the
official outputs, so `make test` checks parity without the official code. The checkouts are never committed.
"""

from __future__ import annotations

import builtins
import contextlib
import csv
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from arvision.cli.common import config_dir

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
RESULTS = HERE / "parity.csv"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "parity"
COLUMNS = ["family", "model", "size", "output", "max_abs_diff", "tolerance", "within", "official_commit"]


@dataclass
class Row:
    family: str
    model: str          # the preset (official=…) or a tiny stand-in's description
    size: str           # tiny | published
    output: str         # what was compared (logits, greedy tokens, decoded images, …)
    max_abs_diff: float
    tolerance: float    # 0 for exact equality (token sequences, kept sets)
    official_commit: str

    def as_csv(self) -> dict[str, str]:
        return {"family": self.family, "model": self.model, "size": self.size, "output": self.output,
                "max_abs_diff": f"{self.max_abs_diff:.1e}" if self.max_abs_diff else "0",
                "tolerance": f"{self.tolerance:.0e}" if self.tolerance else "exact",
                "within": "yes" if self.max_abs_diff <= self.tolerance else "NO",
                "official_commit": self.official_commit}


def max_abs(ours: torch.Tensor, official: torch.Tensor) -> float:
    if ours.shape != official.shape:
        raise AssertionError(f"shapes differ: ours {tuple(ours.shape)}, official {tuple(official.shape)}")
    if not ours.is_floating_point():  # token ids, kept sets: any difference counts fully
        return float((ours != official).sum())
    return float((ours.double() - official.double()).abs().max()) if ours.numel() else 0.0


def commit_of(repo: Path) -> str:
    """The checkout's commit (a git work tree), else the name of the folder (an exported archive)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return repo.name


@contextlib.contextmanager
def official_imports(repo: Path) -> Iterator[None]:
    """The checkout first on sys.path (its packages are called `models`, `utils`, …), and removed again with every
    module it brought, so two checkouts never mix."""
    if not repo.is_dir():
        raise SystemExit(f"official checkout not found: {repo} (pass --repo <clone of the official code>)")
    before = set(sys.modules)
    sys.path.insert(0, str(repo.resolve()))
    try:
        yield
    finally:
        sys.path.remove(str(repo.resolve()))
        for name in set(sys.modules) - before:
            module = sys.modules[name]
            if str(getattr(module, "__file__", "") or "").startswith(str(repo.resolve())):
                del sys.modules[name]


@contextlib.contextmanager
def on_cpu() -> Iterator[None]:
    """For official code that calls `.cuda()` on tensors it makes (FlowAR, MAR): the identity here (CPU, fp32); its
    constructors' prints are silenced, which the rows do not need."""
    cuda, printer = torch.Tensor.cuda, builtins.print
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    builtins.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.Tensor.cuda, builtins.print = cuda, printer


def write_rows(family: str, rows: list[Row], path: Path = RESULTS) -> None:
    """Replace `family`'s rows in the CSV, keep the others; print them."""
    kept = []
    if path.is_file():
        with open(path, newline="") as handle:
            kept = [r for r in csv.DictReader(handle) if r["family"] != family]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(kept + [r.as_csv() for r in rows])
    for row in rows:
        r = row.as_csv()
        print(f"{r['family']:9} {r['model']:24} {r['size']:9} {r['output']:34} {r['max_abs_diff']:>8} "
              f"(≤ {r['tolerance']}) {r['within']}")
    if any(r.max_abs_diff > r.tolerance for r in rows):
        raise SystemExit(f"{family}: a row is outside its tolerance")


def save_fixture(family: str, blob: dict) -> Path:
    """Tensors and plain containers only (tests read it with weights_only)."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{family}.pt"
    torch.save(blob, path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return path


def compose_import(overrides: list[str], root: Path) -> DictConfig:
    """conf/import.yaml as `arvision-import` composes it, with every path rooted in `root`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="import", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir, cfg.paths.output_dir = str(root), str(root / "run")
        cfg.paths.artifact_dir, cfg.paths.data_dir, cfg.paths.log_dir = (str(root / "artifacts"), str(root / "data"),
                                                                         str(root / "outputs"))
    return cfg
