# %% [markdown]
# # 02 · Base model and VAE
# Pick the model to train on: a preset, a Hugging Face repo (`owner/name`) or file (`owner/name/file.safetensors`),
# a URL, a Civitai model (`civitai:ID` or its page URL) or a path on Drive. For anime models train on an SD 1.5
# based checkpoint (Anything V5, Counterfeit V3, AbyssOrangeMix3) and pick `anime-vae`.
#
# Private or gated files need a token: add `HF_TOKEN` or `CIVITAI_TOKEN` in Colab's 🔑 *Secrets* panel (never type
# a token into a form — form values are saved in the notebook). Downloads resume after an interruption.

# %% [setup]

# %% [parameters]
#@title Model { display-mode: "form" }
base_model = "sd15"  #@param ["sd15", "sd21-base", "sd21-768v", "anything-v5", "counterfeit-v3", "abyssorangemix3"] {allow-input: true}
vae_model = ""  #@param ["", "anime-vae", "sd-vae-ft-mse"] {allow-input: true}

# %%
from lycolab.steps import model
choice = model.get_model(ws, base_model, vae_model)

# %%
choice
