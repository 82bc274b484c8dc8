"""The rows of a study, from its committed CSV or from a folder of runs: what the notebooks read.

Each study under `experiments/<study>/` commits its runs as `results.csv`, written from the runs with
`arvision-table <runs> --layout all --format csv --out experiments/<study>/results.csv` (add `--evaluations rows` for
a study made of arvision-eval entries, as flexvar_steps). `study_rows(study)` reads that CSV; `study_rows(study,
runs)` (or `$ARVISION_RUNS`) reads a runs folder instead, keeping the rows a filter picks (e.g. `tags=scaling`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import pandas as pd

from arvision.analysis.collect import collect
from arvision.analysis.tables import read_csv, select_rows

REPO = Path(__file__).resolve().parents[3]


def load(source: str | Path, *, evaluations: Literal["latest", "rows"] = "latest") -> pd.DataFrame:
    """A runs folder (`collect`) or a CSV written by `arvision-table --format csv` (`read_csv`)."""
    return read_csv(source) if Path(source).suffix == ".csv" else collect(source, evaluations=evaluations)


def study_csv(study: str) -> Path:
    """Where a study's committed rows live: experiments/<study>/results.csv of the repository."""
    return REPO / "experiments" / study / "results.csv"


def study_rows(study: str, runs: str | Path | None = None, *, rows: str | None = None,
               evaluations: Literal["latest", "rows"] = "latest") -> pd.DataFrame:
    """The rows of one study.

    `runs` (else `$ARVISION_RUNS`): a runs folder or a CSV, filtered by `rows` (e.g. "tags=scaling"), one row per
    run or, with `evaluations="rows"`, also one per arvision-eval entry. Neither: the study's committed CSV, as
    written. A study whose CSV is not committed gives no rows. `describe(frame)` says which it was.
    """
    runs = runs if runs is not None else os.environ.get("ARVISION_RUNS") or None
    if runs is not None:
        frame = select_rows(load(Path(runs).expanduser(), evaluations=evaluations), rows)
        frame.attrs["source"] = f"{runs}" + (f" ({rows})" if rows else "")
        return frame
    path = study_csv(study)
    if not path.is_file():
        frame = pd.DataFrame()
        frame.attrs["source"] = f"{path.relative_to(REPO)}, not committed: experiments/{study}/README.md says how " \
                                f"to produce it (or point RUNS at a runs folder)"
        return frame
    frame = read_csv(path)
    frame.attrs["source"] = str(path.relative_to(REPO))
    return frame


def describe(frame: pd.DataFrame) -> str:
    """One line: how many rows, from where (a committed CSV, a runs folder, or a CSV not committed yet)."""
    commits = sorted({str(sha)[:7] for sha in frame.get("git_sha", pd.Series(dtype=object)).dropna()})
    at = f" at commit {', '.join(commits)}" if commits else ""
    return f"{len(frame)} rows from {frame.attrs.get('source', 'a frame')}{at}"


__all__ = ["describe", "load", "study_csv", "study_rows"]
