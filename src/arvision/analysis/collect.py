"""`collect(dir)`: every results.json under a directory → one tidy DataFrame (one row per run)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

DEFAULT_COLUMNS = ["tokenizer", "generator", "data", "gen.params", "tok.psnr", "tok.usage", "gen.fid", "gen.is",
                   "gen.precision", "gen.recall", "gen.accuracy", "gen.nfe_per_image", "gen.sample_img_per_s"]


def _flatten_metrics(prefix: str, metrics: dict) -> dict[str, object]:
    row: dict[str, object] = {}
    for name, entry in metrics.items():
        if isinstance(entry, dict):
            row[f"{prefix}.{name}"] = entry.get("value")
            if "extractor" in entry:
                row[f"{prefix}.{name}.extractor"] = entry["extractor"]
            if "num_samples" in entry:
                row[f"{prefix}.{name}.num_samples"] = entry["num_samples"]
        else:
            row[f"{prefix}.{name}"] = entry
    return row


def collect(root: str | Path) -> pd.DataFrame:
    rows = []
    for path in sorted(Path(root).rglob("results.json")):
        results = json.loads(path.read_text())
        row: dict[str, object] = {"run": str(path.parent), "tokenizer": results.get("tokenizer"),
                                  "generator": results.get("generator"), "data": results.get("data"),
                                  "seed": results.get("seed")}
        row.update({f"choice.{k}": v for k, v in results.get("choices", {}).items()})
        row.update(_flatten_metrics("tok", results.get("metrics", {}).get("tokenizer", {})))
        row.update(_flatten_metrics("gen", results.get("metrics", {}).get("generator", {})))
        row.update({f"cost.{k}": v for k, v in results.get("costs", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def render(frame: pd.DataFrame, *, columns: list[str] | None = None, fmt: str = "markdown",
           floatfmt: str = ".4g") -> str:
    columns = [c for c in (columns or DEFAULT_COLUMNS) if c in frame.columns]
    table = frame[columns]
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "latex":
        return table.to_latex(index=False, float_format=lambda x: format(x, floatfmt))
    if fmt == "markdown":
        header = "| " + " | ".join(columns) + " |"
        rule = "|" + "|".join("---" for _ in columns) + "|"
        lines = [header, rule]
        for _, r in table.iterrows():
            cells = [format(v, floatfmt) if isinstance(v, float) else ("" if v is None else str(v)) for v in r]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    raise ValueError(f"format must be markdown, latex or csv, got {fmt!r}")
