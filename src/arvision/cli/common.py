"""Helpers shared by the Hydra entry points."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

import arvision.utils.resolvers  # noqa: F401  (registers ${tiny:…} before any config is composed)


def config_dir() -> str:
    """The repository's conf/ (editable install), or $ARVISION_CONF."""
    env = os.environ.get("ARVISION_CONF")
    if env:
        return str(Path(env).resolve())
    repo_conf = Path(__file__).resolve().parents[3] / "conf"
    if repo_conf.is_dir():
        return str(repo_conf)
    raise SystemExit("arvision: conf/ not found; install from the repository (pip install -e .) or set ARVISION_CONF")


def fail(message: str) -> None:
    """One clear line on stderr and a non-zero exit, instead of a traceback for user errors."""
    print(f"arvision: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def print_table(title: str, rows: list[dict[str, object]]) -> None:
    """Print rows (dicts with the same keys) as a rich table; a single row prints as metric | value."""
    if not rows:
        return
    if len(rows) == 1:
        rows = [{"metric": k, "value": v} for k, v in rows[0].items()]
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(str(key), justify="left" if key in ("run", "metric") else "right")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)
