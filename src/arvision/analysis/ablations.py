"""The paper ablations as tidy frames and figures: ACDiT block size (Fig. 4), FlexVAR steps, scaling laws.

Each `*_frame` takes a `collect()` frame (for steps: `collect(dir, evaluations="rows")`, one row per
arvision-eval entry), keeps the relevant rows and returns readable columns, sorted along the swept setting.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from arvision.analysis.plots import plot_curve
from arvision.analysis.scaling import plot_scaling, scaling_fits


def block_size_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """acdit runs: block size, blocks per image, FID, precision, recall, steps (backbone passes), s/image."""
    runs = frame[(frame.get("generator") == "acdit") & frame.get("cfg.block_size").notna()].copy()
    out = pd.DataFrame({
        "model": runs["model"], "block size": pd.to_numeric(runs["cfg.block_size"]),
        "blocks": pd.to_numeric(runs["tokens_per_image"]) // pd.to_numeric(runs["cfg.block_size"]),
        "FID": runs.get("gen.fid"), "precision": runs.get("gen.precision"), "recall": runs.get("gen.recall"),
        "steps": runs.get("steps"), "s/image": runs.get("s_per_image"),
    })
    return out.sort_values("block size", kind="stable").reset_index(drop=True)


def steps_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """FlexVAR zero-shot steps: one row per arvision-eval entry of a next_scale run that set a schedule, with
    the number of steps it sampled with and the number the model was trained with (its default schedule)."""
    picked = rows[(rows.get("generator") == "next_scale") & rows.get("eval.sample.schedule").notna()] \
        if "eval.sample.schedule" in rows else rows.iloc[:0]
    out = pd.DataFrame({
        "model": picked.get("model"), "schedule": picked.get("eval.sample.schedule"),
        "steps": pd.to_numeric(picked.get("eval.sample.schedule.len")),
        "trained steps": pd.to_numeric(picked.get("gen.nfe_per_image")),
        "FID": picked.get("eval.fid"), "IS": picked.get("eval.is"), "precision": picked.get("eval.precision"),
        "recall": picked.get("eval.recall"), "s/image": picked.get("eval.s_per_image"),
    }, columns=["model", "schedule", "steps", "trained steps", "FID", "IS", "precision", "recall", "s/image"])
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
