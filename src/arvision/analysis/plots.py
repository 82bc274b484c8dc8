"""Line plots of one metric against a swept setting (block size, sampling steps, depth), one line per group.

Used by the ablation notebook: FID vs ACDiT block size, FID vs FlexVAR sampling steps. Figures are built on
`matplotlib.figure.Figure` directly, so they render headless (Agg) and in notebooks alike.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def plot_curve(frame: pd.DataFrame, *, x: str, y: str, by: str | None = None, ax: Axes | None = None,
               logx: bool = False, xlabel: str | None = None, ylabel: str | None = None,
               mark: float | None = None, mark_label: str = "trained") -> Figure:
    """y against x (points sorted by x, missing values skipped), one line per value of `by`; `mark` draws a
    vertical line at a reference x (e.g. the number of steps the model was trained with)."""
    if ax is None:
        fig = Figure(figsize=(5, 3.6), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    if any(c not in frame for c in [x, y, *([by] if by else [])]):
        groups = []  # no rows of this kind: an empty figure
    else:
        groups = [(None, frame)] if by is None else list(frame.groupby(by, dropna=True, sort=True))
    for name, part in groups:
        xs = pd.to_numeric(part[x], errors="coerce").to_numpy(float)
        ys = pd.to_numeric(part[y], errors="coerce").to_numpy(float)
        ok = np.isfinite(xs) & np.isfinite(ys)
        order = np.argsort(xs[ok], kind="stable")
        ax.plot(xs[ok][order], ys[ok][order], marker="o", label=None if name is None else str(name))
    if mark is not None:
        ax.axvline(mark, color="gray", linestyle=":", label=mark_label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return fig


__all__ = ["plot_curve"]
