"""The paper ablations as tidy frames and figures: ACDiT block size (Fig. 4), FlexVAR steps, scaling laws.

Each `*_frame` takes a `collect()` frame (for steps: `collect(dir, evaluations="rows")`, one row per
arvision-eval entry), keeps the relevant rows and returns readable columns, sorted along the swept setting. A frame
without such rows (or without the columns) gives an empty table and an empty figure.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from arvision.analysis.plots import plot_curve
from arvision.analysis.scaling import plot_scaling, scaling_fits


def _rows(frame: pd.DataFrame, generator: str, setting: str) -> pd.DataFrame:
    """The rows of `generator` that record `setting` (none when the frame lacks either column)."""
    if "generator" not in frame or setting not in frame:
        return frame.iloc[:0]
    return frame[(frame["generator"] == generator) & frame[setting].notna()]


def _column(rows: pd.DataFrame, name: str, *, numeric: bool = True) -> pd.Series:
    if name not in rows:
        return pd.Series(np.nan, index=rows.index, dtype=float)
    return pd.to_numeric(rows[name], errors="coerce") if numeric else rows[name]


def block_size_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """acdit runs: block size, blocks per image, FID, precision, recall, accuracy, steps (backbone passes),
    test loss, s/image."""
    runs = _rows(frame, "acdit", "cfg.block_size")
    out = pd.DataFrame({
        "model": _column(runs, "model", numeric=False), "block size": _column(runs, "cfg.block_size"),
        "blocks": _column(runs, "tokens_per_image") // _column(runs, "cfg.block_size"),
        "FID": _column(runs, "gen.fid"), "IS": _column(runs, "gen.is"), "precision": _column(runs, "gen.precision"),
        "recall": _column(runs, "gen.recall"), "accuracy": _column(runs, "gen.accuracy"),
        "steps": _column(runs, "steps"), "test loss": _column(runs, "test_loss"),
        "s/image": _column(runs, "s_per_image"),
    })
    return out.sort_values("block size", kind="stable").reset_index(drop=True)


def steps_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """FlexVAR zero-shot steps: one row per arvision-eval entry of a next_scale run that set a schedule, with
    the number of steps it sampled with and the number the model was trained with (its default schedule)."""
    picked = _rows(rows, "next_scale", "eval.sample.schedule")
    out = pd.DataFrame({
        "model": _column(picked, "model", numeric=False),
        "schedule": _column(picked, "eval.sample.schedule", numeric=False),
        "steps": _column(picked, "eval.sample.schedule.len"), "trained steps": _column(picked, "gen.nfe_per_image"),
        "FID": _column(picked, "eval.fid"), "IS": _column(picked, "eval.is"),
        "precision": _column(picked, "eval.precision"), "recall": _column(picked, "eval.recall"),
        "accuracy": _column(picked, "eval.accuracy"), "img/s": _column(picked, "eval.sample_img_per_s"),
    })
    return out.sort_values(["model", "steps"], kind="stable").reset_index(drop=True)


def plot_block_size(frame: pd.DataFrame) -> Figure:
    fig = plot_curve(block_size_frame(frame), x="block size", y="FID", logx=True, xlabel="block size (tokens)")
    fig.axes[0].set_title("ACDiT: FID vs block size")
    return fig


def plot_steps(rows: pd.DataFrame) -> Figure:
    steps = steps_frame(rows)
    trained = steps["trained steps"].dropna()
    fig = plot_curve(steps, x="steps", y="FID", by="model", xlabel="sampling steps (scales)",
                     mark=float(trained.iloc[0]) if len(trained) else None, mark_label="trained steps")
    fig.axes[0].set_title("FlexVAR: zero-shot steps")
    return fig


def scaling_frame(frame: pd.DataFrame, *, x: str = "gen.params", y: str = "test_loss") -> pd.DataFrame:
    """One power law per generator (exponent, prefactor, Pearson r of the log-log fit)."""
    return scaling_fits(frame, x=x, y=y, by="generator")


def plot_scaling_laws(frame: pd.DataFrame) -> Figure:
    """Test loss vs parameters and vs training compute, side by side."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    plot_scaling(frame, x="gen.params", y="test_loss", ax=left, xlabel="parameters N", ylabel="test loss")
    plot_scaling(frame, x="train_compute", y="test_loss", ax=right, xlabel="training compute C (FLOPs ≈ 6ND)",
                 ylabel="test loss")
    return fig


__all__ = ["block_size_frame", "plot_block_size", "plot_scaling_laws", "plot_steps", "scaling_frame",
           "steps_frame"]
