# %% [markdown]
# # 07 · Save to Drive
# Keeps `output/` (adapters, samples, states), `config/` and `logs/` — and optionally `train_data/` — on Google
# Drive, as one zip per folder (quick to download) or as plain copies. Empty destination =
# `MyDrive/lycolab_backups/<project>`.

# %% [parameters]
#@title Workspace { display-mode: "form" }
project = "my_lora"  #@param {type:"string"}
workspace_root = ""  #@param {type:"string"}

# %%
from lycolab.colab import open_workspace
ws = open_workspace(project, workspace_root)

# %% [parameters]
#@title Save { display-mode: "form" }
destination = ""  #@param {type:"string"}
include_train_data = False  #@param {type:"boolean"}
as_zip = True  #@param {type:"boolean"}

# %%
from lycolab.steps import save
saved = save.save_to_drive(ws, destination, include_train_data, as_zip)

# %%
saved
