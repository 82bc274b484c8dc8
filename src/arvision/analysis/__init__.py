"""Gather results.json files into one DataFrame; paper-style tables, scaling-law fits and Pareto plots.

    from arvision.analysis import collect, table, scaling_fits, plot_scaling, plot_pareto
    runs = collect("outputs/multirun/…")
    print(table(runs, layout="var", rows="generator=raster,next_scale", sort="FID"))
"""

from arvision.analysis.ablations import (block_size_frame, plot_block_size, plot_scaling_laws, plot_steps,
                                         scaling_frame, steps_frame)
from arvision.analysis.collect import PARADIGM_TYPES, collect, runs_dir, tokens_per_image
from arvision.analysis.pareto import pareto_front, plot_pareto
from arvision.analysis.plots import plot_curve
from arvision.analysis.scaling import PowerLaw, fit_power_law, plot_scaling, scaling_fits
from arvision.analysis.tables import (HEADERS, LAYOUTS, layout_frame, relative_time, render, select_rows,
                                      sort_rows, table)

__all__ = [
    "block_size_frame",
    "plot_block_size",
    "plot_scaling_laws",
    "plot_steps",
    "scaling_frame",
    "steps_frame",
    "HEADERS",
    "LAYOUTS",
    "PARADIGM_TYPES",
    "PowerLaw",
    "collect",
    "fit_power_law",
    "layout_frame",
    "pareto_front",
    "plot_curve",
    "plot_pareto",
    "plot_scaling",
    "relative_time",
    "render",
    "runs_dir",
    "scaling_fits",
    "select_rows",
    "sort_rows",
    "table",
    "tokens_per_image",
]
