# %% [markdown]
# # 09 · Adapter tools
# Work on the adapters in the project's `output/` folder (on Drive in Colab): **inspect** a file's settings and tags,
# **resize** it to a lower rank, **merge** several into one, **extract** one from a fine-tuned model, **convert**
# between kohya and diffusers/PEFT keys. Each section is a form and one cell; a section whose main field is empty is
# skipped. File names are names in `output/` (or full paths); an empty name is the project's final adapter. New
# files are written to `output/`. Works on a CPU runtime; a GPU makes resize, merge and extract much faster.

# %% [setup]

# %% [parameters]
#@title Inspect { display-mode: "form" }
#@markdown The algorithm, modules, ranks and alphas, training settings, most frequent tags and dataset folders.
inspect_adapter = ""  #@param {type:"string"}
top_tags = 20  #@param {type:"integer"}

# %%
from lycolab.steps import tools
info = tools.inspect(ws, inspect_adapter, top_tags)

# %%
info

# %% [parameters]
#@title Resize { display-mode: "form" }
#@markdown A lower rank by SVD, as sd-scripts' `resize_lora.py`. `new_rank` 0 = skip (or the most a dynamic method
#@markdown may keep: 0 = no limit). `sv_fro` keeps that fraction of each module's Frobenius norm (e.g. 0.9).
resize_adapter = ""  #@param {type:"string"}
new_rank = 0  #@param {type:"integer"}
new_conv_rank = 0  #@param {type:"integer"}
dynamic_method = "none"  #@param ["none", "sv_fro", "sv_ratio", "sv_cumulative"]
dynamic_param = 0.9  #@param {type:"number"}
resize_output_name = ""  #@param {type:"string"}

# %%
from lycolab.steps import tools
resized = tools.resize(ws, resize_adapter, new_rank, new_conv_rank, dynamic_method, dynamic_param,
                       output_name=resize_output_name)

# %%
resized

# %% [parameters]
#@title Merge adapters { display-mode: "form" }
#@markdown Files with ratios, e.g. `style.safetensors:0.7, character.safetensors:0.5`; empty = skip. `merge_rank` 0
#@markdown keeps LoRA ranks side by side (exact); a rank re-factorises the sum by SVD (any algorithm).
merge_adapters = ""  #@param {type:"string"}
merge_rank = 0  #@param {type:"integer"}
merge_conv_rank = 0  #@param {type:"integer"}
merge_output_name = ""  #@param {type:"string"}

# %%
from lycolab.steps import tools
merged = tools.merge(ws, merge_adapters, merge_rank, merge_conv_rank, output_name=merge_output_name)

# %%
merged

# %% [parameters]
#@title Extract from a fine-tuned model { display-mode: "form" }
#@markdown The LoRA/LoCon between the base model (empty = step 02's) and a fine-tuned one (a file or diffusers
#@markdown folder on Drive; empty = skip), as LyCORIS' `extract_locon.py`. `fixed` uses the dims; `threshold`,
#@markdown `ratio` and `quantile` pick each module's rank from its singular values.
tuned_model = ""  #@param {type:"string"}
base_model = ""  #@param {type:"string"}
mode = "fixed"  #@param ["fixed", "threshold", "ratio", "quantile"]
linear_dim = 64  #@param {type:"integer"}
conv_dim = 32  #@param {type:"integer"}
threshold = 0.0  #@param {type:"number"}
ratio = 0.0  #@param {type:"number"}
quantile = 1.0  #@param {type:"number"}
extract_text_encoder = True  #@param {type:"boolean"}
extract_output_name = ""  #@param {type:"string"}

# %%
from lycolab.steps import tools
extracted = tools.extract(ws, tuned_model, base_model, mode, linear_dim, conv_dim, threshold, ratio, quantile,
                          extract_text_encoder, output_name=extract_output_name)

# %%
extracted

# %% [parameters]
#@title Convert { display-mode: "form" }
#@markdown `diffusers`: kohya LoRA/LoCon → the PEFT layout diffusers' `load_lora_weights` and PEFT read;
#@markdown `kohya`: a diffusers/PEFT LoRA → kohya keys (A1111, ComfyUI, lycolab); `none` = skip.
convert_adapter = ""  #@param {type:"string"}
convert_to = "none"  #@param ["none", "diffusers", "kohya"]
convert_output_name = ""  #@param {type:"string"}

# %%
from lycolab.steps import tools
converted = tools.convert(ws, convert_adapter, convert_to, convert_output_name)

# %%
converted
