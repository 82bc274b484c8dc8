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
# # Ablations: scaling laws, ACDiT block size, FlexVAR steps
#
# * **Scaling** (VAR §4.3): test loss against parameters N and training compute C, fitted as power laws
#   L = a·N^b by least squares in log-log space; the exponent and the Pearson correlation are reported per
#   generator. The test loss comes from `arvision-eval select=[test_loss]` (or the training run, if it recorded one).
# * **Block size** (ACDiT Fig. 4): FID against the number of tokens per block at a fixed sequence length.
# * **FlexVAR steps**: a next-scale model in FlexVAR mode sampled zero-shot with fewer and more scales than it
#   was trained with (`arvision-eval sample.schedule=[…]`, one evaluation per schedule).
#
# Parameters: `RUNS` (`None`: `$ARVISION_RUNS`, else the checked-in fixture), and one row filter per study.
# Everything below only calls `arvision.analysis`.

# %% tags=["parameters"]
RUNS = None
SCALING_ROWS = "tags=scaling"
BLOCK_ROWS = "tags=block_size"
STEPS_ROWS = "tags=flexvar_steps"

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from arvision.analysis import (block_size_frame, collect, plot_block_size, plot_scaling_laws, plot_steps, render,
                               runs_dir, scaling_frame, select_rows, steps_frame)

runs = collect(runs_dir(RUNS))
evaluations = collect(runs_dir(RUNS), evaluations="rows")
print(f"{len(runs)} runs, {len(evaluations) - len(runs)} arvision-eval entries under {runs_dir(RUNS)}")

# %% [markdown]
# ## Scaling laws

# %%
scaling = select_rows(runs, SCALING_ROWS)
display(Markdown(render(scaling_frame(scaling), columns=["group", "exponent", "prefactor", "pearson_r",
                                                         "num_points"])))
display(Markdown(render(scaling_frame(scaling, x="train_compute"), columns=["group", "exponent", "prefactor",
                                                                          "pearson_r", "num_points"])))

# %%
plot_scaling_laws(scaling)

# %% [markdown]
# ## ACDiT block size

# %%
blocks = select_rows(runs, BLOCK_ROWS)
frame = block_size_frame(blocks)
display(Markdown(render(frame, columns=list(frame.columns))))

# %%
plot_block_size(blocks)

# %% [markdown]
# ## FlexVAR: zero-shot sampling steps

# %%
steps_rows = select_rows(evaluations, STEPS_ROWS)
frame = steps_frame(steps_rows)
display(Markdown(render(frame, columns=list(frame.columns))))

# %%
plot_steps(steps_rows)
