# %% [markdown]
# # 01 · Install lycolab
# Installs lycolab and what it needs **without touching Colab's own torch**, mounts Google Drive (in Colab) and
# opens the project's workspace — the folders every later step reads and writes. Every step notebook does the same
# in its first cell, so any of them can be opened alone; this one also shows what the runtime has.
#
# Steps 01–05 run on a CPU runtime (prepare on CPU, train on GPU); for 06 and 08 choose *Runtime → Change runtime
# type → T4 GPU* (those notebooks ask for it). In a local Jupyter the workspace is `./workspace/<project>`.

# %% [setup]

# %%
from lycolab.steps import environment
environment.describe(ws)
