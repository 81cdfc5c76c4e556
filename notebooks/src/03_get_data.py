# %% [markdown]
# # 03 · Training images
# Put 20+ images into `train_data/` (subfolders are fine; a folder named `10_mychar` is repeated 10 times per
# epoch, as in sd-scripts). Sources: `upload` a zip from this computer, a `zip` or `folder` on Drive
# (`/content/drive/MyDrive/...`), `urls` (a text file with one image URL per line, or the URLs themselves) or a
# `hub` dataset (`owner/name`). Only images and `.txt`/`.caption` files are taken.
#
# Then the dataset doctor checks every image: unreadable or truncated files, missing captions, near-duplicates,
# and how the images fall into buckets.

# %% [parameters]
#@title Workspace { display-mode: "form" }
project = "my_lora"  #@param {type:"string"}
workspace_root = ""  #@param {type:"string"}

# %%
from lycolab.colab import open_workspace
ws = open_workspace(project, workspace_root)

# %% [parameters]
#@title Get the images { display-mode: "form" }
source = "upload"  #@param ["upload", "zip", "folder", "urls", "hub"]
location = ""  #@param {type:"string"}
subfolder = ""  #@param {type:"string"}

# %%
from lycolab.steps import data
added = data.get_data(ws, source, location, subfolder)

# %%
added

# %% [parameters]
#@title Dataset doctor { display-mode: "form" }
resolution = 512  #@param [512, 768] {type:"raw"}

# %%
report = data.dataset_report(ws, resolution)

# %%
report
