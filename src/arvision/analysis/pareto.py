"""Pareto fronts of quality vs cost (FID vs seconds per image, both to be minimised), and their plot.

A point is on the front when no other point is at least as good in both coordinates and strictly better in one.
Equal points do not dominate each other, so duplicates on the front are all kept. `pareto_front` sorts by cost
(then quality) and sweeps once, O(n log n); points with a missing coordinate are never on the front.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def pareto_front(cost, quality) -> np.ndarray:
    """Boolean mask of the non-dominated points, both coordinates minimised."""
    x = np.asarray(pd.to_numeric(pd.Series(np.asarray(cost).ravel()), errors="coerce"), dtype=float)
    y = np.asarray(pd.to_numeric(pd.Series(np.asarray(quality).ravel()), errors="coerce"), dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"cost and quality differ in length: {x.shape} vs {y.shape}")
    front = np.zeros(len(x), dtype=bool)
    valid = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    order = valid[np.lexsort((y[valid], x[valid]))]  # by cost, ties by quality
    best = np.inf  # lowest quality value among strictly cheaper points
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and x[order[j]] == x[order[i]]:
            j += 1
        same_cost = order[i:j]
        lowest = y[same_cost[0]]  # sorted: the first is the best at this cost
        if lowest < best:
            # at equal cost only the best quality survives (ties included)
            front[same_cost[y[same_cost] == lowest]] = True
            best = lowest
        i = j
    return front


def plot_pareto(frame: pd.DataFrame, *, x: str = "s_per_image", y: str = "gen.fid", label: str = "model",
                ax: Axes | None = None, logx: bool = True, xlabel: str = "sampling time (s / image)",
                ylabel: str = "FID") -> Figure:
    """Scatter of every run, the front drawn as a step line and its points ringed, each point labelled."""
    if ax is None:
        fig = Figure(figsize=(5, 3.6), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    missing = pd.Series(np.nan, index=frame.index, dtype=float)  # a frame without the column: no points
    xs = pd.to_numeric(frame.get(x, missing), errors="coerce").to_numpy(float)
    ys = pd.to_numeric(frame.get(y, missing), errors="coerce").to_numpy(float)
    on_front = pareto_front(xs, ys)
    ok = np.isfinite(xs) & np.isfinite(ys)
    ax.scatter(xs[ok & ~on_front], ys[ok & ~on_front], color="tab:gray", label="dominated", zorder=3)
    ax.scatter(xs[on_front], ys[on_front], color="tab:red", edgecolor="black", label="Pareto front", zorder=4)
    order = np.argsort(xs[on_front])
    ax.step(xs[on_front][order], ys[on_front][order], where="post", color="tab:red", alpha=0.6)
    names = frame[label].astype(str).to_numpy() if label in frame else np.arange(len(frame)).astype(str)
    for px, py, name in zip(xs[ok], ys[ok], names[ok]):
        ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    if logx and ok.any() and (xs[ok] > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


__all__ = ["pareto_front", "plot_pareto"]
