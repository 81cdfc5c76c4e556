# %% [markdown]
# # 05 · Training configuration
# Every option of the old notebook's step 5, with its defaults. Running the last cell writes sd-scripts' two files,
# `config/config_file.toml` and `config/dataset_config.toml` (they run unchanged in sd-scripts too), checks every
# value, and shows how many steps that makes. Aim for images × repeats × epochs of about 1000–3000.

# %% [parameters]
#@title Workspace { display-mode: "form" }
project = "my_lora"  #@param {type:"string"}
workspace_root = ""  #@param {type:"string"}

# %%
from lycolab.colab import open_workspace
ws = open_workspace(project, workspace_root)

# %% [parameters]
#@title 5.1 Model { display-mode: "form" }
#@markdown `auto` uses what step 02 found; SD 1.5-based models are `SD 1.x`. Leave the paths empty to use step 02's.
model_version = "auto"  #@param ["auto", "SD 1.x", "SD 2.x (512, base)", "SD 2.x (768, v-prediction)"]
pretrained_model_name_or_path = ""  #@param {type:"string"}
vae = ""  #@param {type:"string"}

# %% [parameters]
#@title 5.2 Dataset { display-mode: "form" }
#@markdown `dataset_repeats` applies to folders without an `N_` prefix (a `10_name` folder keeps its 10).
dataset_repeats = 10  #@param {type:"integer"}
resolution = 512  #@param [512, 768] {type:"raw"}
caption_extension = ".txt"  #@param [".txt", ".caption"]
shuffle_caption = True  #@param {type:"boolean"}
keep_tokens = 0  #@param {type:"integer"}
flip_aug = False  #@param {type:"boolean"}
enable_bucket = True  #@param {type:"boolean"}
bucket_no_upscale = False  #@param {type:"boolean"}

# %% [parameters]
#@title 5.3 LoRA and optimizer { display-mode: "form" }
network_category = "LoCon_Lycoris"  #@param ["LoRA", "LoCon", "LoCon_Lycoris", "LoHa", "LoKr"]
network_dim = 32  #@param {type:"integer"}
network_alpha = 16  #@param {type:"number"}
conv_dim = 8  #@param {type:"integer"}
conv_alpha = 4  #@param {type:"number"}
#@markdown D-Adaptation and Prodigy find the step size themselves: set both learning rates to 1.0 for them.
optimizer_type = "AdamW8bit"  #@param ["AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "DAdaptation", "Prodigy", "AdaFactor"]
optimizer_args = ""  #@param {type:"string"}
unet_lr = 1e-4  #@param {type:"number"}
text_encoder_lr = 5e-5  #@param {type:"number"}
network_train_unet_only = False  #@param {type:"boolean"}
lr_scheduler = "constant"  #@param ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "adafactor"]
lr_warmup_steps = 0  #@param {type:"integer"}
lr_scheduler_num_cycles = 1  #@param {type:"integer"}

# %% [parameters]
#@title 5.4 Training { display-mode: "form" }
num_epochs = 10  #@param {type:"integer"}
train_batch_size = 6  #@param {type:"integer"}
mixed_precision = "fp16"  #@param ["no", "fp16", "bf16"]
save_precision = "fp16"  #@param ["float", "fp16", "bf16"]
save_every_n_epochs = 1  #@param {type:"integer"}
#@markdown `save_state` keeps what step 06 needs to resume after a disconnect.
save_state = True  #@param {type:"boolean"}
max_token_length = 225  #@param [75, 150, 225] {type:"raw"}
#@markdown clip_skip 2 for anime models, 1 for realistic ones.
clip_skip = 2  #@param {type:"integer"}
gradient_checkpointing = False  #@param {type:"boolean"}
gradient_accumulation_steps = 1  #@param {type:"integer"}
seed = -1  #@param {type:"integer"}
lowram = True  #@param {type:"boolean"}
xformers = True  #@param {type:"boolean"}
cache_latents = True  #@param {type:"boolean"}
noise_offset = 0.0  #@param {type:"number"}
min_snr_gamma = 0.0  #@param {type:"number"}
output_name = ""  #@param {type:"string"}
training_comment = ""  #@param {type:"string"}

# %% [parameters]
#@title 5.5 Sample prompts { display-mode: "form" }
#@markdown Samples after every saved epoch. One prompt per line (`\n` between them); options `--n` negative
#@markdown prompt, `--w`/`--h` size, `--s` steps, `--l` guidance, `--d` seed. Empty = a default with the trigger word.
enable_sample_prompt = True  #@param {type:"boolean"}
sampler = "euler_a"  #@param ["euler_a", "euler", "ddim", "dpmsolver++", "pndm", "lms", "heun", "dpm_2", "dpm_2_a"]
sample_prompts = ""  #@param {type:"string"}

# %%
from lycolab.steps import configure
plan = configure.configure(ws, model_version=model_version, pretrained_model_name_or_path=pretrained_model_name_or_path, vae=vae, dataset_repeats=dataset_repeats, resolution=resolution, caption_extension=caption_extension, shuffle_caption=shuffle_caption, keep_tokens=keep_tokens, flip_aug=flip_aug, enable_bucket=enable_bucket, bucket_no_upscale=bucket_no_upscale, network_category=network_category, network_dim=network_dim, network_alpha=network_alpha, conv_dim=conv_dim, conv_alpha=conv_alpha, optimizer_type=optimizer_type, optimizer_args=optimizer_args, unet_lr=unet_lr, text_encoder_lr=text_encoder_lr, network_train_unet_only=network_train_unet_only, lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps, lr_scheduler_num_cycles=lr_scheduler_num_cycles, num_epochs=num_epochs, train_batch_size=train_batch_size, mixed_precision=mixed_precision, save_precision=save_precision, save_every_n_epochs=save_every_n_epochs, save_state=save_state, max_token_length=max_token_length, clip_skip=clip_skip, gradient_checkpointing=gradient_checkpointing, gradient_accumulation_steps=gradient_accumulation_steps, seed=seed, lowram=lowram, xformers=xformers, cache_latents=cache_latents, noise_offset=noise_offset, min_snr_gamma=min_snr_gamma, output_name=output_name, training_comment=training_comment, enable_sample_prompt=enable_sample_prompt, sampler=sampler, sample_prompts=sample_prompts)

# %%
plan
