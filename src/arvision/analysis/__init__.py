"""Gather results.json files into one DataFrame; paper-style tables, scaling-law fits and Pareto plots.

    from arvision.analysis import collect, table, scaling_fits, plot_scaling, plot_pareto
    runs = collect("outputs/multirun/…")          # or load("experiments/<study>/results.csv"), study_rows(study)
    print(table(runs, layout="var", rows="generator=raster,next_scale", sort="FID"))
"""

from arvision.analysis.ablations import (block_size_frame, plot_block_size, plot_scaling_laws, plot_steps,
                                         scaling_frame, steps_frame)
from arvision.analysis.collect import PARADIGM_TYPES, collect, runs_dir, tokens_per_image
from arvision.analysis.pareto import pareto_front, plot_pareto
from arvision.analysis.plots import plot_curve
from arvision.analysis.scaling import PowerLaw, fit_power_law, plot_scaling, scaling_fits
from arvision.analysis.studies import describe, load, study_csv, study_rows
from arvision.analysis.tables import (HEADERS, LAYOUTS, layout_frame, read_csv, relative_time, render,
                                      select_rows, sort_rows, table)

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
    "describe",
    "fit_power_law",
    "layout_frame",
    "load",
    "pareto_front",
    "plot_curve",
    "plot_pareto",
    "plot_scaling",
    "read_csv",
    "relative_time",
    "render",
    "runs_dir",
    "scaling_fits",
    "select_rows",
    "sort_rows",
    "study_csv",
    "study_rows",
    "table",
    "tokens_per_image",
]
