# %% [markdown]
# # 05 · Training configuration
# Every option of the old notebook's step 5, with its defaults. Running the last cell writes sd-scripts' two files,
# `config/config_file.toml` and `config/dataset_config.toml` (they run unchanged in sd-scripts too), checks every
# value, and shows how many steps that makes. Aim for images × repeats × epochs of about 1000–3000.
#
# | network_category | network_dim / alpha | conv_dim / alpha |
# |---|---|---|
# | LoRA | 32 / 16 (8–128 common) | — |
# | LoCon | 32 / 16 | 8–16 / half |
# | LoCon_Lycoris | 8–32 / dim/2, dim or 1 | ≤ 32 / half |
# | LoHa | ≤ 32 / dim/2 or 1 (rank is dim²) | ≤ 32 / half |
# | LoKr | 8–32 / 1 or dim/2 | ≤ 32 / half |
# | IA3 | ignored (learning rate about 5e-3) | ignored |
# | Full | ignored (a fine-tuning learning rate; big files) | ignored |
# | Diag-OFT | block size 4–32, a divisor of 320/640/1280 | the same |
# | BOFT | largest block size 8–32 (width = even block × power of two) | the same |
# | GLoRA | ≤ 64 / 1 to dim/2 | ≤ 32 / half |
#
# All of them: [docs/algorithms.md](https://github.com/lycolab/lycolab/blob/main/docs/algorithms.md).

# %% [setup]

# %% [parameters]
#@title 5.1 Model { display-mode: "form" }
#@markdown `auto` uses what step 02 found; SD 1.5-based models are `SD 1.x`, Animagine/Pony/Illustrious are `SDXL`,
#@markdown NoobAI-XL v-pred is `SDXL (v-prediction…)`. Leave the paths empty to use step 02's. Every `auto`/`0` below
#@markdown follows the model: SDXL trains at 1024 px in 512–2048 buckets, the U-Net only, with its text encoders'
#@markdown outputs cached (captions then stay unshuffled) and gradient checkpointing — what fits a 15 GB T4.
model_version = "auto"  #@param ["auto", "SD 1.x", "SD 2.x (512, base)", "SD 2.x (768, v-prediction)", "SDXL", "SDXL (v-prediction, zero terminal SNR)"]
pretrained_model_name_or_path = ""  #@param {type:"string"}
vae = ""  #@param {type:"string"}

# %% [parameters]
#@title 5.2 Dataset { display-mode: "form" }
#@markdown `dataset_repeats` applies to folders without an `N_` prefix (a `10_name` folder keeps its 10).
dataset_repeats = 10  #@param {type:"integer"}
#@markdown `resolution` 0 = auto (512 SD 1.x, 768 SD 2.x v, 1024 SDXL); bucket sizes 0 = auto (256–1024, SDXL 512–2048).
resolution = 0  #@param [0, 512, 768, 1024] {type:"raw"}
#@markdown `auto` = the extension step 04 wrote.
caption_extension = "auto"  #@param ["auto", ".txt", ".caption"]
shuffle_caption = True  #@param {type:"boolean"}
keep_tokens = 0  #@param {type:"integer"}
flip_aug = False  #@param {type:"boolean"}
enable_bucket = True  #@param {type:"boolean"}
min_bucket_reso = 0  #@param {type:"integer"}
max_bucket_reso = 0  #@param {type:"integer"}
bucket_no_upscale = False  #@param {type:"boolean"}
#@markdown Regularization images (sd-scripts' `is_reg`): a folder (empty = the project's `reg_data/`, used when it
#@markdown holds images). `class_prompt` captions those without a caption file.
reg_images = ""  #@param {type:"string"}
class_prompt = ""  #@param {type:"string"}
reg_repeats = 1  #@param {type:"integer"}
prior_loss_weight = 1.0  #@param {type:"number"}

# %% [parameters]
#@title 5.3 LoRA and optimizer { display-mode: "form" }
network_category = "LoCon_Lycoris"  #@param ["LoRA", "LoCon", "LoCon_Lycoris", "LoHa", "LoKr", "IA3", "Full", "Diag-OFT", "BOFT", "GLoRA"]
network_dim = 32  #@param {type:"integer"}
network_alpha = 16  #@param {type:"number"}
conv_dim = 8  #@param {type:"integer"}
conv_alpha = 4  #@param {type:"number"}
#@markdown DoRA (weight-decomposed training) for LoCon_Lycoris, LoHa or LoKr; more LyCORIS/sd-scripts options go in
#@markdown `network_args` as `key=value` items, e.g. `preset=attn-mlp rank_dropout=0.1 loraplus_lr_ratio=16`.
dora_wd = False  #@param {type:"boolean"}
network_args = ""  #@param {type:"string"}
#@markdown Continue from an adapter you trained before (its `.safetensors`; same network settings).
network_weights = ""  #@param {type:"string"}
#@markdown D-Adaptation and Prodigy find the step size themselves: set both learning rates to 1.0 for them.
optimizer_type = "AdamW8bit"  #@param ["AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "DAdaptation", "Prodigy", "AdaFactor"]
optimizer_args = ""  #@param {type:"string"}
unet_lr = 1e-4  #@param {type:"number"}
text_encoder_lr = 5e-5  #@param {type:"number"}
network_train_unet_only = "auto"  #@param ["auto", "yes", "no"]
cache_text_encoder_outputs = "auto"  #@param ["auto", "yes", "no"]
lr_scheduler = "constant"  #@param ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "adafactor"]
lr_warmup_steps = 0  #@param {type:"integer"}
lr_scheduler_num_cycles = 1  #@param {type:"integer"}

# %% [parameters]
#@title 5.4 Training { display-mode: "form" }
num_epochs = 10  #@param {type:"integer"}
train_batch_size = 6  #@param {type:"integer"}
vae_batch_size = 1  #@param {type:"integer"}
mixed_precision = "fp16"  #@param ["no", "fp16", "bf16"]
save_precision = "fp16"  #@param ["float", "fp16", "bf16"]
save_every_n_epochs = 1  #@param {type:"integer"}
#@markdown Keep only the newest N epoch files (0 = all) and N states: `save_state` is what step 06 resumes from
#@markdown after a disconnect; one state is enough, each is as large as the optimizer.
save_last_n_epochs = 0  #@param {type:"integer"}
save_state = True  #@param {type:"boolean"}
save_last_n_epochs_state = 1  #@param {type:"integer"}
max_token_length = 225  #@param [75, 150, 225] {type:"raw"}
#@markdown clip_skip 2 for anime models, 1 for realistic ones; 0 = auto (2 for SD 1.x, 1 for SD 2.x).
clip_skip = 0  #@param {type:"integer"}
gradient_checkpointing = "auto"  #@param ["auto", "yes", "no"]
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

# %% [parameters]
#@title 5.6 More sample prompts, one per line (optional) { display-mode: "both" }
sample_prompt_lines = """
"""

# %%
from lycolab.steps import configure
plan = configure.configure(ws, model_version=model_version, pretrained_model_name_or_path=pretrained_model_name_or_path, vae=vae, dataset_repeats=dataset_repeats, resolution=resolution, caption_extension=caption_extension, shuffle_caption=shuffle_caption, keep_tokens=keep_tokens, flip_aug=flip_aug, enable_bucket=enable_bucket, bucket_no_upscale=bucket_no_upscale, network_category=network_category, network_dim=network_dim, network_alpha=network_alpha, conv_dim=conv_dim, conv_alpha=conv_alpha, dora_wd=dora_wd, network_args=network_args, optimizer_type=optimizer_type, optimizer_args=optimizer_args, unet_lr=unet_lr, text_encoder_lr=text_encoder_lr, network_train_unet_only=network_train_unet_only, cache_text_encoder_outputs=cache_text_encoder_outputs, lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps, lr_scheduler_num_cycles=lr_scheduler_num_cycles, num_epochs=num_epochs, train_batch_size=train_batch_size, mixed_precision=mixed_precision, save_precision=save_precision, save_every_n_epochs=save_every_n_epochs, save_state=save_state, max_token_length=max_token_length, clip_skip=clip_skip, gradient_checkpointing=gradient_checkpointing, gradient_accumulation_steps=gradient_accumulation_steps, seed=seed, lowram=lowram, xformers=xformers, cache_latents=cache_latents, noise_offset=noise_offset, min_snr_gamma=min_snr_gamma, output_name=output_name, training_comment=training_comment, enable_sample_prompt=enable_sample_prompt, sampler=sampler, sample_prompts=sample_prompts, sample_prompt_lines=sample_prompt_lines, vae_batch_size=vae_batch_size, min_bucket_reso=min_bucket_reso, max_bucket_reso=max_bucket_reso, save_last_n_epochs=save_last_n_epochs, save_last_n_epochs_state=save_last_n_epochs_state, network_weights=network_weights, reg_images=reg_images, class_prompt=class_prompt, reg_repeats=reg_repeats, prior_loss_weight=prior_loss_weight)

# %%
plan

# %% [parameters]
#@title Estimate { display-mode: "form" }
#@markdown Time per step, VRAM and session fit on the GPU step 06 will use (`auto` = this runtime's). An estimate
#@markdown from published speeds and parameter counts, not a measurement.
estimate_for = "T4"  #@param ["auto", "T4", "L4", "V100", "A100-40GB", "A100-80GB", "H100", "CPU"]

# %%
configure.estimate(ws, estimate_for)
