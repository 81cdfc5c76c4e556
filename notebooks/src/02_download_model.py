# %% [markdown]
# # 02 · Base model and VAE
# Pick the model to train on: a preset, a Hugging Face repo (`owner/name`) or file (`owner/name/file.safetensors`),
# a URL, a Civitai model (`civitai:ID` or its page URL) or a path on Drive. For anime models train on an SD 1.5
# based checkpoint (Anything V5, Counterfeit V3, AbyssOrangeMix3) and pick `anime-vae`, or on an SDXL one (Animagine
# XL, Pony V6 XL, Illustrious XL, NoobAI-XL v-pred) with `sdxl-vae-fp16-fix`: step 05 then switches to SDXL's
# defaults (1024 px, U-Net only, text-encoder outputs cached), which fit a 15 GB T4.
#
# Private or gated files need a token: add `HF_TOKEN` or `CIVITAI_TOKEN` in Colab's 🔑 *Secrets* panel (never type
# a token into a form — form values are saved in the notebook). Downloads resume after an interruption.

# %% [setup]

# %% [parameters]
#@title Model { display-mode: "form" }
base_model = "sd15"  #@param ["sd15", "sd21-base", "sd21-768v", "anything-v5", "counterfeit-v3", "abyssorangemix3", "sdxl-base", "animagine-xl", "pony-v6-xl", "illustrious-xl", "noobai-xl-vpred"] {allow-input: true}
vae_model = ""  #@param ["", "anime-vae", "sd-vae-ft-mse", "sdxl-vae-fp16-fix"] {allow-input: true}

# %%
from lycolab.steps import model
choice = model.get_model(ws, base_model, vae_model)

# %%
choice
