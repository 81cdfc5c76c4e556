# %% [markdown]
# # 08 · Compare epochs
# Renders every prompt with every saved epoch (and the base model) at the same seed, as one grid: pick the last
# epoch before the images turn over-stylised. One prompt per line (`\n` between them); kohya options allowed.

# %% [setup]

# %% [parameters]
#@title Compare { display-mode: "form" }
prompts = "masterpiece, best quality, 1girl --n lowres, bad anatomy"  #@param {type:"string"}
#@markdown `all`, or epoch numbers separated by commas (e.g. `2, 4, 6, final`).
epochs = "all"  #@param {type:"string"}
seed = 42  #@param {type:"integer"}
steps = 20  #@param {type:"integer"}
include_base = True  #@param {type:"boolean"}

# %%
from lycolab.steps import compare
grid = compare.compare_epochs(ws, prompts, epochs, seed, steps, include_base=include_base)

# %%
grid
