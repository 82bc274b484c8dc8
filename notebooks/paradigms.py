# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Paradigm comparison
#
# One row per paradigm (raster AR, next-scale VAR, FlowAR, ACDiT) in the layout of VAR's Table 1, and the
# quality/cost trade-off as a Pareto plot of FID against sampling time. Every number comes from the runs'
# `results.json` files through `arvision.analysis`; this notebook only calls it.
#
# Parameters: `RUNS` (a runs directory; `None` reads `$ARVISION_RUNS`, else the checked-in fixture of tiny runs),
# `ROWS` (a row filter as in `arvision-table --rows`), `REFERENCE` (relative time is measured against this
# model/generator/type; `None`: the fastest row), `SOURCE` (`gen`: the training run's evaluation; `eval`: the
# latest `arvision-eval`). With papermill: `papermill paradigms.ipynb out.ipynb -p RUNS outputs/multirun/…`.

# %% tags=["parameters"]
RUNS = None
ROWS = "tags=paradigms"
REFERENCE = None
SOURCE = "gen"

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from arvision.analysis import collect, plot_pareto, runs_dir, select_rows, table

runs = collect(runs_dir(RUNS))
paradigms = select_rows(runs, ROWS)
print(f"{len(paradigms)} of {len(runs)} runs under {runs_dir(RUNS)}")

# %% [markdown]
# ## Table (VAR Table 1 layout)

# %%
display(Markdown(table(paradigms, layout="var", sort="type", source=SOURCE, reference=REFERENCE)))

# %% [markdown]
# ## Tokenizers and the full metric set

# %%
display(Markdown(table(paradigms, layout=["model", "tok.psnr", "tok.rfid", "tok.usage", "gen.fid", "gen.kid",
                                          "gen.accuracy", "gen.nfe_per_image", "gen.sample_img_per_s"],
                       sort="model")))

# %% [markdown]
# ## FID vs sampling time (Pareto front)

# %%
plot_pareto(paradigms, x="s_per_image", y="gen.fid", label="model")
