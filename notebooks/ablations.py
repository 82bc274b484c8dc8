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
# # Ablations: scaling laws, ACDiT block size, FlexVAR steps
#
# * **Scaling** (VAR §4.3): test loss against parameters N and training compute C, fitted as power laws
#   L = a·N^b by least squares in log-log space; the exponent and the Pearson correlation are reported per
#   generator. The test loss comes from `arvision-eval select=[test_loss]` (or the training run, if it recorded one).
# * **Block size** (ACDiT Fig. 4): FID against the number of tokens per block at a fixed sequence length.
# * **FlexVAR steps**: a next-scale model in FlexVAR mode sampled zero-shot with fewer and more scales than it
#   was trained with (`arvision-eval +sample.schedule=[…]`, one evaluation per schedule).
#
# By default each section reads its study's committed CSV, `experiments/<study>/results.csv` (a study without one
# shows no rows and says so). Parameters: `RUNS` (a runs folder or CSV to read instead; `None` reads
# `$ARVISION_RUNS` when set) and, for `RUNS`, one row filter per study. Everything below only calls
# `arvision.analysis`.

# %% tags=["parameters"]
RUNS = None
SCALING_ROWS = "tags=scaling"
BLOCK_ROWS = "tags=block_size"
STEPS_ROWS = "tags=flexvar_steps"

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from arvision.analysis import (block_size_frame, describe, plot_block_size, plot_scaling_laws, plot_steps, render,
                               scaling_frame, steps_frame, study_rows)

# %% [markdown]
# ## Scaling laws

# %%
scaling = study_rows("scaling", RUNS, rows=SCALING_ROWS)
print(describe(scaling))
display(Markdown(render(scaling_frame(scaling), columns=["group", "exponent", "prefactor", "pearson_r",
                                                         "num_points"])))
display(Markdown(render(scaling_frame(scaling, x="train_compute"), columns=["group", "exponent", "prefactor",
                                                                          "pearson_r", "num_points"])))

# %%
plot_scaling_laws(scaling)

# %% [markdown]
# ## ACDiT block size

# %%
blocks = study_rows("acdit_block_size", RUNS, rows=BLOCK_ROWS)
print(describe(blocks))
frame = block_size_frame(blocks)
display(Markdown(render(frame, columns=list(frame.columns))))

# %%
plot_block_size(blocks)

# %% [markdown]
# ## FlexVAR: zero-shot sampling steps

# %%
steps_rows = study_rows("flexvar_steps", RUNS, rows=STEPS_ROWS, evaluations="rows")
print(describe(steps_rows))
frame = steps_frame(steps_rows)
display(Markdown(render(frame, columns=list(frame.columns))))

# %%
plot_steps(steps_rows)
