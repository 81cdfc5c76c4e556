# %% [markdown]
# # 07 · Save and share
# In Colab the project already lives on Google Drive (`MyDrive/lycolab/<project>`), so nothing is stored twice:
# this step lists what is there. A workspace kept elsewhere (`workspace_root` off Drive, or a local Jupyter) is
# saved as one zip per folder — `output/` (adapters, samples, states), `config/`, `logs/` and optionally
# `train_data/` — or as plain copies. Empty destination = `MyDrive/lycolab_backups/<project>`.
#
# Then, optionally, publish the adapter on the Hugging Face Hub with a generated model card (trigger word, base
# model, sample images, settings). Add a write token as `HF_TOKEN` in Colab's 🔑 *Secrets* panel first — never in a
# form field, whose values are saved in the notebook.

# %% [setup]

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

# %% [parameters]
#@title Publish on the Hugging Face Hub (optional) { display-mode: "form" }
#@markdown `your-name/my-lora`; empty = do not upload. `adapter` empty = the final file in `output/`.
hub_repo = ""  #@param {type:"string"}
private = True  #@param {type:"boolean"}
adapter = ""  #@param {type:"string"}

# %%
published = save.publish_to_hub(ws, hub_repo, private, adapter)

# %%
published
