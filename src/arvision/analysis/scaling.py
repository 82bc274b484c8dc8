"""Scaling laws: fit L = a·N^b by least squares in log-log space, and plot them.

VAR (§4.3) reports test loss against parameters N and training compute C as power laws with Pearson correlation
near −0.99 in log-log space; `fit_power_law` returns the same three numbers: the exponent b (the slope of
log L on log N), the prefactor a = exp(intercept), and the Pearson r of (log N, log L). Points with a
non-positive or missing x or y cannot be on a power law and are dropped (and counted). `scaling_fits` fits one
law per group (e.g. per generator), `plot_scaling` draws the points and fitted lines on log-log axes.

Compute is `train_compute` from `collect()` (≈ 6·N·D FLOPs with D the training tokens); the exponent in N is
the one VAR's claim is about.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure


@dataclass(frozen=True)
class PowerLaw:
    """y ≈ prefactor · x^exponent, fitted on `num_points` points (`dropped` were non-positive or missing)."""

    exponent: float
    prefactor: float
    pearson_r: float
    num_points: int
    dropped: int = 0

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.prefactor * np.power(np.asarray(x, dtype=float), self.exponent)

    def label(self) -> str:
        return f"L = {self.prefactor:.3g}·N^{self.exponent:.3f} (r = {self.pearson_r:.3f})"

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def fit_power_law(x, y) -> PowerLaw:
    """Least-squares line through (log x, log y); needs at least two usable points with distinct x."""
    x = np.asarray(pd.to_numeric(pd.Series(np.asarray(x).ravel()), errors="coerce"), dtype=float)
    y = np.asarray(pd.to_numeric(pd.Series(np.asarray(y).ravel()), errors="coerce"), dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.shape} vs {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x[ok]), np.log(y[ok])
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise ValueError(f"a power-law fit needs at least two points with distinct positive x; got {len(lx)} "
                         f"usable of {len(x)}")
    slope, intercept = np.polyfit(lx, ly, 1)
    # Pearson r of the log-log points; an exact fit with no spread in y has r undefined: report 0.
    r = float(np.corrcoef(lx, ly)[0, 1]) if np.ptp(ly) > 0 else 0.0
    return PowerLaw(exponent=float(slope), prefactor=float(np.exp(intercept)), pearson_r=r,
                    num_points=int(ok.sum()), dropped=int((~ok).sum()))


def _groups(frame: pd.DataFrame, columns: list[str], by: str | None) -> list[tuple[object, pd.DataFrame]]:
    if any(c not in frame for c in [*columns, *([by] if by else [])]):
        return []
    return [(None, frame)] if by is None else list(frame.groupby(by, dropna=True, sort=True))


def scaling_fits(frame: pd.DataFrame, *, x: str = "gen.params", y: str = "test_loss",
                 by: str | None = "generator") -> pd.DataFrame:
    """One power law per group of `by` (or one overall): columns group, exponent, prefactor, pearson_r, points.
    A frame without the columns has no groups."""
    groups = _groups(frame, [x, y], by)
    rows = []
    for name, part in groups:
        try:
            law = fit_power_law(part[x], part[y])
        except ValueError:
            continue  # fewer than two usable points in this group
        rows.append({"group": name if by is not None else "all", **law.as_dict()})
    return pd.DataFrame(rows, columns=["group", "exponent", "prefactor", "pearson_r", "num_points", "dropped"])


def plot_scaling(frame: pd.DataFrame, *, x: str = "gen.params", y: str = "test_loss", by: str | None = "generator",
                 ax: Axes | None = None, xlabel: str | None = None, ylabel: str | None = None) -> Figure:
    """Log-log scatter of y vs x with one fitted power law per group (labelled with its exponent and r)."""
    if ax is None:
        fig = Figure(figsize=(5, 3.6), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    groups = [("all" if name is None else name, part) for name, part in _groups(frame, [x, y], by)]
    for name, part in groups:
        xs = pd.to_numeric(part[x], errors="coerce").to_numpy(float)
        ys = pd.to_numeric(part[y], errors="coerce").to_numpy(float)
        ok = np.isfinite(xs) & np.isfinite(ys) & (xs > 0) & (ys > 0)
        if not ok.any():
            continue
        points = ax.scatter(xs[ok], ys[ok], label=str(name), zorder=3)
        if ok.sum() >= 2 and np.ptp(xs[ok]) > 0:
            law = fit_power_law(xs[ok], ys[ok])
            grid = np.geomspace(xs[ok].min(), xs[ok].max(), 50)
            ax.plot(grid, law(grid), color=points.get_facecolor()[0], linestyle="--",
                    label=f"{name}: b = {law.exponent:.3f}, r = {law.pearson_r:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return fig


__all__ = ["PowerLaw", "fit_power_law", "plot_scaling", "scaling_fits"]
