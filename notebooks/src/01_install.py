# %% [markdown]
# # 01 · Install lycolab
# Installs lycolab and what it needs **without touching Colab's own torch**, mounts Google Drive (in Colab) and
# opens the project's workspace — the folders every later step reads and writes. In a local Jupyter, untick
# `install_packages` if lycolab is already installed; the workspace is then `./workspace/<project>`.

# %% [parameters]
#@title Install { display-mode: "form" }
#@markdown Installs `requirements-colab.txt` (no torch in it) and then lycolab itself with `--no-deps`.
install_packages = True  #@param {type:"boolean"}

# %%
if install_packages:
    %pip install --quiet -r https://raw.githubusercontent.com/lycolab/lycolab/main/requirements-colab.txt
    %pip install --quiet --no-deps git+https://github.com/lycolab/lycolab

# %% [parameters]
#@title Project { display-mode: "form" }
#@markdown The project name is the folder that holds everything (Drive: `MyDrive/lycolab/<project>`).
#@markdown Leave `workspace_root` empty for that default.
project = "my_lora"  #@param {type:"string"}
workspace_root = ""  #@param {type:"string"}

# %%
from lycolab.colab import open_workspace
ws = open_workspace(project, workspace_root)

# %%
from lycolab.steps import environment
environment.describe(ws)
