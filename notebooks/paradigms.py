# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Paradigm comparison
#
# One row per paradigm (raster AR, next-scale VAR, FlowAR, ACDiT) in the layout of VAR's Table 1, and the
# quality/cost trade-off as a Pareto plot of FID against sampling time. Every number comes from `results.json`
# files through `arvision.analysis`; this notebook only calls it.
#
# Parameters: `STUDY` (the committed CSV read by default: `experiments/<STUDY>/results.csv`; `demo` is `make demo`,
# the comparison at 40 % of the step budget), `RUNS` (a runs folder or CSV to read instead; `None` reads
# `$ARVISION_RUNS` when set), `ROWS` (a row filter for `RUNS`, as in `arvision-table --rows`), `REFERENCE` (relative
# time is measured against this model/generator/type; `None`: the fastest row), `SOURCE` (`gen`: the training
# run's evaluation; `eval`: the latest `arvision-eval`). With papermill:
# `papermill paradigms.ipynb out.ipynb -p RUNS outputs/multirun/…`.

# %% tags=["parameters"]
STUDY = "demo"
RUNS = None
ROWS = "tags=paradigms"
REFERENCE = None
SOURCE = "gen"

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from arvision.analysis import describe, plot_pareto, study_rows, table

paradigms = study_rows(STUDY, RUNS, rows=ROWS)
print(describe(paradigms))

# %% [markdown]
# ## Table (VAR Table 1 layout)

# %%
display(Markdown(table(paradigms, layout="var", sort="type", source=SOURCE, reference=REFERENCE)))

# %% [markdown]
# ## Tokenizers and the full metric set

# %%
display(Markdown(table(paradigms, layout=["model", "tok.psnr", "tok.rfid", "tok.usage", "gen.fid", "gen.kid",
                                          "gen.accuracy", "gen.nfe_per_image", "gen.sample_img_per_s", "git_sha"],
                       sort="model")))

# %% [markdown]
# ## FID vs sampling time (Pareto front)

# %%
plot_pareto(paradigms, x="s_per_image", y="gen.fid", label="model")
