"""Paper-style tables from a `collect()` DataFrame: row filters, sorting, layouts, Markdown / LaTeX / CSV.

Layouts are lists of (column, header) pairs. `default` is the main metrics of every run, with a column for each
override whose value differs between the rows shown (a sweep's values, named by their dotted key, after tokenizer,
generator and data); `var` is the VAR paper's Table 1: type, model, params, FID, IS, precision, recall, steps,
relative time. `relative time` is the sampling time per image divided by that of the fastest row (or of a chosen
reference row, as VAR normalises to VAR); `steps` counts generation steps (backbone passes, so an RQ depth head
does not inflate it).

Markdown and LaTeX show numbers for reading (parameters as 1.2M, floats with 4 significant digits, commits as
7 characters, missing as "–"). CSV keeps the raw values under the collected column names, and `table(fmt="csv")`
adds each run's `git_sha` and the `command` that reruns it, so a committed CSV is auditable and `read_csv` reads
it back into the frame it came from: a table rendered from it equals the table rendered from the runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from arvision.analysis.collect import swept_values

# Readable headers for the collected columns (any other column keeps its own name).
HEADERS = {
    "tokenizer": "tokenizer", "generator": "generator", "data": "data", "type": "type", "model": "model",
    "gen.params": "params", "tok.params": "tok. params", "gen.fid": "FID", "gen.is": "IS", "gen.kid": "KID",
    "gen.precision": "precision", "gen.recall": "recall", "gen.accuracy": "accuracy", "gen.nfe_per_image": "NFE",
    "gen.sample_img_per_s": "img/s", "gen.latency_img_per_s": "latency img/s", "s_per_image": "s/image", "steps": "steps", "relative_time": "relative time",
    "tok.psnr": "PSNR", "tok.ssim": "SSIM", "tok.rfid": "rFID", "tok.usage": "usage", "tok.perplexity": "perplexity",
    "eval.fid": "FID (eval)", "eval.sfid": "sFID (eval)", "eval.is": "IS (eval)", "eval.precision": "precision (eval)",
    "eval.recall": "recall (eval)", "eval.accuracy": "accuracy (eval)", "eval.kid": "KID (eval)",
    "eval.sample_img_per_s": "img/s (eval)", "eval.sample.schedule": "schedule", "eval.sample.schedule.len":
    "schedule steps", "eval.num_samples": "N (eval)", "eval.device": "device (eval)",
    "test_loss": "test loss", "train_compute": "train FLOPs", "cfg.depth": "depth", "cfg.block_size": "block size",
    "cfg.sample_steps": "sampling steps", "cost.stage2_seconds": "stage-2 s", "cost.total_seconds": "total s",
    "cost.stage.feature_extractor": "extractor s", "cost.stage.tokenizer_train": "tokenizer s",
    "cost.stage.tokenizer_eval": "tok. eval s", "cost.stage.encode": "encode s",
    "cost.stage.generator_train": "generator s", "cost.stage.reference_stats": "reference s",
    "cost.stage.generator_sampling": "sampling s", "cost.stage.generator_metrics": "metrics s",
    "cost.stage.generator_test_loss": "test-loss s", "cost.stage.generator_eval": "grids s",
    "git_sha": "commit", "eval.git_sha": "commit (eval)", "command": "command", "eval.command": "command (eval)",
}

DEFAULT_LAYOUT = ["tokenizer", "generator", "data", "gen.params", "tok.psnr", "tok.usage", "gen.fid", "gen.is",
                  "gen.precision", "gen.recall", "gen.accuracy", "gen.nfe_per_image", "gen.sample_img_per_s"]
VAR_LAYOUT = ["type", "model", "gen.params", "gen.fid", "gen.is", "gen.precision", "gen.recall", "steps",
              "relative_time"]
# The paradigm comparison (make demo): VAR's columns plus what a small class-conditional run is judged by.
PARADIGMS_LAYOUT = [*VAR_LAYOUT, "gen.accuracy", "gen.sample_img_per_s", "gen.latency_img_per_s",
                    "cost.stage2_seconds", "tok.psnr"]
# Where a run's wall-clock went (a cached tokenizer, token cache or classifier shows as its load time).
STAGES_LAYOUT = ["tokenizer", "generator", "cost.stage.feature_extractor", "cost.stage.tokenizer_train",
                 "cost.stage.tokenizer_eval", "cost.stage.encode", "cost.stage.generator_train",
                 "cost.stage.reference_stats", "cost.stage.generator_sampling", "cost.stage.generator_metrics",
                 "cost.stage.generator_test_loss", "cost.stage.generator_eval", "cost.total_seconds"]
LAYOUTS = {"default": DEFAULT_LAYOUT, "var": VAR_LAYOUT, "paradigms": PARADIGMS_LAYOUT, "stages": STAGES_LAYOUT,
           "all": []}  # every collected column: what a study's committed results.csv holds
# Where each row came from; CSV output always carries them (the eval ones when a row has an arvision-eval entry).
PROVENANCE = ["git_sha", "command", "eval.git_sha", "eval.command"]


def header(column: str) -> str:
    return HEADERS.get(column, column)


# --------------------------------------------------------------------------------------------- rows
def _matches(series: pd.Series, wanted: list[str]) -> pd.Series:
    """Cells equal to one of `wanted` (as text or as a number), or comma lists (e.g. tags) containing one."""
    as_text = series.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    numeric = pd.to_numeric(series, errors="coerce")
    hit = as_text.isin(wanted) | as_text.map(lambda t: "," in t and bool(set(t.split(",")) & set(wanted)))
    for w in wanted:  # "depth=4" also matches 4.0
        try:
            hit |= numeric == float(w)
        except ValueError:
            pass
    return hit


def select_rows(frame: pd.DataFrame, filters: str | Iterable[str] | None) -> pd.DataFrame:
    """Keep the rows matching every filter `column=v1,v2` (or `column!=v1,v2`); filters may also be joined with ';'.

    Columns may be named by their collected name or their readable header (e.g. `FID`).
    """
    if not filters:
        return frame
    if isinstance(filters, str):
        filters = [filters]
    keep = pd.Series(True, index=frame.index)
    for item in (part.strip() for f in filters for part in f.split(";")):
        if not item:
            continue
        negate = "!=" in item
        column, sep, values = item.partition("!=" if negate else "=")
        if not sep:
            raise ValueError(f"row filter must look like column=value[,value…]; got {item!r}")
        column = resolve_column(frame, column.strip())
        hit = _matches(frame[column], [v.strip() for v in values.split(",")])
        keep &= ~hit if negate else hit
    return frame[keep]


def resolve_column(frame: pd.DataFrame, name: str) -> str:
    """A column named by itself or by its readable header."""
    if name in frame.columns:
        return name
    by_header = [c for c in frame.columns if header(c) == name]
    if by_header:
        return by_header[0]
    raise KeyError(f"no column {name!r}; columns include: {', '.join(map(str, list(frame.columns)[:40]))}")


def sort_rows(frame: pd.DataFrame, keys: str | Sequence[str] | None) -> pd.DataFrame:
    """Sort by comma-separated columns; a leading '-' sorts that column descending. Missing values go last."""
    if not keys:
        return frame
    if isinstance(keys, str):
        keys = [k for k in keys.split(",") if k.strip()]
    columns, ascending = [], []
    for key in keys:
        key = key.strip()
        columns.append(resolve_column(frame, key.lstrip("-")))
        ascending.append(not key.startswith("-"))
    return frame.sort_values(columns, ascending=ascending, na_position="last", kind="stable")


# --------------------------------------------------------------------------------------------- layouts
def relative_time(frame: pd.DataFrame, *, column: str = "s_per_image", reference: str | None = None) -> pd.Series:
    """Time per image relative to the fastest row, or to the first row whose `model`/`generator`/`type` is
    `reference` (VAR's Table 1 normalises to VAR)."""
    if column not in frame:
        return pd.Series(np.nan, index=frame.index)
    seconds = pd.to_numeric(frame[column], errors="coerce")
    if reference is None:
        base = seconds.min()
    else:
        picked = frame[(frame.get("model") == reference) | (frame.get("generator") == reference)
                       | (frame.get("type") == reference)]
        if picked.empty:
            raise ValueError(f"relative time: no row is model/generator/type {reference!r}")
        base = seconds[picked.index[0]]
    return seconds / base


def with_swept(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """`frame` with a column per override whose value differs between its rows (see `collect.swept_values`; a CSV
    written before collect added them gets them from its `command` column), and those columns' names."""
    if "command" not in frame:
        return frame, []
    swept = swept_values(frame["command"])
    for key, values in swept.items():
        if key not in frame:
            frame[key] = pd.Series(values, index=frame.index)
    return frame, list(swept)


def layout_frame(frame: pd.DataFrame, layout: str | Sequence[str] = "default", *, source: str = "gen",
                 reference: str | None = None) -> pd.DataFrame:
    """The columns of a layout (a name in LAYOUTS or a list of columns), with `relative_time` computed.

    `source="eval"` reads the generation metrics (and sampling time) from the latest `arvision-eval` entry instead
    of the training run's own evaluation.
    """
    if isinstance(layout, str) and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(sorted(LAYOUTS))} or a list of columns; got {layout!r}")
    columns = list(frame.columns if layout == "all" else LAYOUTS[layout] if isinstance(layout, str) else layout)
    frame = frame.copy()
    if layout == "default":  # what tells the rows of a sweep apart, after the tokenizer, generator and data
        frame, swept = with_swept(frame)
        at = columns.index("data") + 1
        columns[at:at] = [c for c in swept if c not in columns]
    if source == "eval":
        for column in list(columns):
            swapped = column.replace("gen.", "eval.", 1)
            if column.startswith("gen.") and swapped in frame:
                columns[columns.index(column)] = swapped
        if "eval.s_per_image" in frame:
            frame["s_per_image"] = frame["eval.s_per_image"]
    elif source != "gen":
        raise ValueError(f"source must be 'gen' or 'eval', got {source!r}")
    if "relative_time" in columns and ("s_per_image" in frame or "relative_time" not in frame):
        frame["relative_time"] = relative_time(frame, reference=reference)
    if not isinstance(layout, str):  # columns asked for by name (or header): an unknown one is an error, not a gap
        return frame[[resolve_column(frame, c) for c in columns]]
    return frame[[c for c in columns if c in frame.columns]]


# --------------------------------------------------------------------------------------------- formats
def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _human_count(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(int(value))


def _cell(column: str, value: object, floatfmt: str) -> str:
    if _is_missing(value):
        return "–"
    if column.endswith("git_sha") and isinstance(value, str):
        return value[:7]
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer, float, np.floating)):
        if column.endswith("params") or column in ("train_compute", "train_tokens"):
            return _human_count(float(value))
        if isinstance(value, (int, np.integer)) or float(value).is_integer() and abs(float(value)) < 1e6:
            return str(int(value))
        return format(float(value), floatfmt)
    return str(value)


def _numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--"}


def _latex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def render(frame: pd.DataFrame, *, columns: Sequence[str] | None = None, fmt: str = "markdown",
           floatfmt: str = ".4g", headers: dict[str, str] | None = None) -> str:
    """The table as Markdown (pipe table), LaTeX (booktabs tabular) or CSV.

    `columns` defaults to the `default` layout (those present). Markdown and LaTeX use readable headers (HEADERS,
    updated with `headers`); CSV keeps raw values under the frame's own column names, so it reads back as it was.
    """
    if fmt not in ("markdown", "latex", "csv"):
        raise ValueError(f"format must be markdown, latex or csv, got {fmt!r}")
    names = {**HEADERS, **(headers or {})}
    columns = [c for c in (columns or DEFAULT_LAYOUT) if c in frame.columns]
    table = frame[columns]
    if fmt == "csv":
        return table.to_csv(index=False)
    if not columns:  # a frame without any of the columns (e.g. a study with no rows yet)
        return "*No rows.*" if fmt == "markdown" else "% no rows"
    labels = [names.get(c, c) for c in columns]
    cells = [[_cell(c, v, floatfmt) for c, v in zip(columns, row)] for row in table.itertuples(index=False)]
    right = [_numeric(table[c]) for c in columns]
    if fmt == "markdown":
        lines = ["| " + " | ".join(labels) + " |", "|" + "|".join("---:" if r else ":---" for r in right) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells]
        return "\n".join(lines)
    lines = [r"\begin{tabular}{" + "".join("r" if r else "l" for r in right) + "}", r"\toprule",
             " & ".join(_latex(label) for label in labels) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex(cell) for cell in row) + r" \\" for row in cells]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def table(frame: pd.DataFrame, *, layout: str | Sequence[str] = "default", rows: str | Iterable[str] | None = None,
          sort: str | Sequence[str] | None = None, fmt: str = "markdown", source: str = "gen",
          reference: str | None = None, floatfmt: str = ".4g") -> str:
    """Filter, lay out, sort and render in one call (what `arvision-table` and the notebooks use).

    Rows are filtered before the layout (so any collected column can filter) and sorted after it (so a layout's
    computed columns, e.g. `relative_time`, can sort); sort keys may be collected names or headers. CSV adds the
    PROVENANCE columns the layout leaves out.
    """
    picked = select_rows(frame, rows).copy()  # one block again: collect() builds its frame column by column
    laid = layout_frame(picked, layout, source=source, reference=reference)
    if sort and not picked.empty:
        extra = [k.strip().lstrip("-") for k in (sort.split(",") if isinstance(sort, str) else sort)]
        missing = [k for k in extra if k not in laid.columns and header_to_column(laid, k) is None]
        if missing:  # a sort key outside the layout: sort the full rows, then lay out again
            picked = sort_rows(picked.assign(relative_time=relative_time(picked, reference=reference)), sort)
            laid = layout_frame(picked, layout, source=source, reference=reference)
        else:
            laid = sort_rows(laid, sort)
    if fmt == "csv":
        evaluated = "eval.git_sha" in picked and picked["eval.git_sha"].notna().any()
        extra = [c for c in PROVENANCE
                 if c not in laid and (evaluated if c.startswith("eval.") else c in picked)]
        laid = laid.join(picked.reindex(index=laid.index, columns=extra))
    return render(laid, columns=list(laid.columns), fmt=fmt, floatfmt=floatfmt)


def read_csv(path: str | Path) -> pd.DataFrame:
    """A CSV written by `arvision-table … --format csv` (e.g. a study's committed results.csv), back as the frame
    it was rendered from: the same column names and values, so tables and analyses read it as they read runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CSV file {path}")
    # Only empty cells are missing: a text cell such as "None" or "nan" stays text.
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def header_to_column(frame: pd.DataFrame, name: str) -> str | None:
    try:
        return resolve_column(frame, name)
    except KeyError:
        return None


__all__ = ["DEFAULT_LAYOUT", "HEADERS", "LAYOUTS", "PROVENANCE", "VAR_LAYOUT", "header", "layout_frame", "read_csv",
           "relative_time", "render", "resolve_column", "select_rows", "sort_rows", "table", "with_swept"]
