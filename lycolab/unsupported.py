"""The sd-scripts options lycolab refuses, each with the reason: an option is either implemented as sd-scripts does
it or refused by name, never silently ignored.

A refused key set to sd-scripts' default (``fp8_base = false``, as generated configs write it) means "off" and is
accepted; any other value stops with one line naming the key and the reason. tests/data/sd_scripts_keys.toml (from
scripts/sd_scripts_keys.py) lists every key sd-scripts' train_network.py and sdxl_train_network.py take; the parity
test checks each is either a lycolab option or here, and ``scripts/parity_table.py`` writes docs/sd-scripts-parity.md
from both.
"""

from __future__ import annotations

from typing import Any

_FP8 = "fp8 weights need a recent GPU and are not supported; use mixed_precision fp16 or bf16"
_DDP = "lycolab sums gradients itself with no DistributedDataParallel wrapper (docs/guide.md § Several processes)"
_HUB = "lycolab uploads with notebook 07 / lycolab.publish.upload_to_hub (a model card, the token from HF_TOKEN)"
_DEEPSPEED = "DeepSpeed is not supported; use gradient_checkpointing and a smaller batch to save memory"
_VALIDATION = "a validation loss is not computed; watch the samples and 08's epoch grid"
_FINE_TUNING = "fine-tuning datasets (metadata JSON) are not supported; use image folders with caption files"
_MASK = "masked and alpha-mask losses are not supported; crop or paint out what should not be learned"

# key: (sd-scripts' default, which means "off" and is accepted; why any other value is refused)
REFUSED_OPTIONS: dict[str, tuple[Any, str]] = {
    "cpu_offload_checkpointing": (False, "checkpoint offloading to CPU is not supported; gradient_checkpointing is"),
    "fp8_base_unet": (False, _FP8),
    "fp8_base": (False, _FP8),
    "skip_until_initial_step": (False, "use resume (a saved state) to continue a run"),
    "initial_epoch": (None, "use resume (a saved state) to continue a run"),
    "initial_step": (None, "use resume (a saved state) to continue a run"),
    "validation_seed": (None, _VALIDATION),
    "validation_split": (0.0, _VALIDATION),
    "validate_every_n_steps": (None, _VALIDATION),
    "validate_every_n_epochs": (None, _VALIDATION),
    "max_validation_steps": (None, _VALIDATION),
    "tokenizer_cache_dir": (None, "tokenizers load from the model folder or the hub cache"),
    "cache_info": (False, "lycolab's latent cache checks each image by its own fingerprint"),
    "skip_cache_check": (False, "lycolab's latent cache checks each image by its own fingerprint"),
    "alpha_mask": (False, _MASK),
    "masked_loss": (False, _MASK),
    "conditioning_data_dir": (None, "ControlNet-style conditioning images are not supported"),
    "dataset_class": (None, "custom dataset classes are not supported; use image folders with caption files"),
    "in_json": (None, _FINE_TUNING),
    "metadata_file": (None, _FINE_TUNING),
    "dataset_repeats": (1, _FINE_TUNING + " (for folders: num_repeats or an N_name folder)"),
    "huggingface_repo_id": (None, _HUB),
    "huggingface_repo_type": (None, _HUB),
    "huggingface_path_in_repo": (None, _HUB),
    "huggingface_token": (None, _HUB + "; never put a token in a config file"),
    "huggingface_repo_visibility": (None, _HUB),
    "save_state_to_huggingface": (False, _HUB),
    "resume_from_huggingface": (False, _HUB),
    "async_upload": (False, _HUB),
    "torch_compile": (False, "torch.compile is not supported"),
    "dynamo_backend": ("inductor", "torch.compile is not supported"),
    "ddp_timeout": (None, _DDP),
    "ddp_gradient_as_bucket_view": (False, _DDP),
    "ddp_static_graph": (False, _DDP),
    "log_tracker_name": (None, "only TensorBoard (logging_dir) and the CSV/JSONL logs are written"),
    "wandb_run_name": (None, "Weights & Biases is not supported; TensorBoard (logging_dir) and CSV/JSONL logs are"),
    "log_tracker_config": (None, "only TensorBoard (logging_dir) and the CSV/JSONL logs are written"),
    "wandb_api_key": (None, "Weights & Biases is not supported, and a key must never be in a config file"),
    "log_config": (False, "the config files themselves are kept in config/ (and ss_* metadata in every adapter)"),
    "highvram": (False, "lycolab places latents and models itself"),
    "disable_mmap_load_safetensors": (False, "models load through diffusers/transformers, which map safetensors "
                                             "themselves"),
    "output_config": (False, "lycolab writes config files from the notebook's step 05, or keeps yours as they are"),
    "deepspeed": (False, _DEEPSPEED),
    "zero_stage": (2, _DEEPSPEED),
    "offload_optimizer_device": (None, _DEEPSPEED),
    "offload_optimizer_nvme_path": (None, _DEEPSPEED),
    "offload_param_device": (None, _DEEPSPEED),
    "offload_param_nvme_path": (None, _DEEPSPEED),
    "zero3_init_flag": (False, _DEEPSPEED),
    "zero3_save_16bit_model": (False, _DEEPSPEED),
    "fp16_master_weights_and_gradients": (False, _DEEPSPEED),
    "fused_backward_pass": (False, "the fused backward pass (AdaFactor, full fine-tuning) is not supported"),
    "weighted_captions": (False, "(word:1.2) prompt weights in captions are not supported"),
    "resize_interpolation": (None, "images are shrunk with Lanczos and enlarged with bicubic, always"),
    "custom_attributes": (None, "custom subset attributes are not supported"),
    "network_multiplier": (1.0, "per-dataset network multipliers are not supported"),
    "debug_dataset": (False, "lycolab check-dataset (notebook 03's doctor) shows what training will use"),
    "color_aug": (False, "it only shifts hue a little and rules out latent caching"),
    "face_crop_aug_range": (None, "it needs face positions in the file names"),
}


def refusal(key: str, value: Any) -> str | None:
    """Why ``key = value`` is refused, or None when ``key`` is not refused or ``value`` is its "off" default."""
    if key not in REFUSED_OPTIONS:
        return None
    default, reason = REFUSED_OPTIONS[key]
    off = value is None or value is False or value == "" or (
        value == default and isinstance(value, bool) == isinstance(default, bool))
    if off:
        return None
    return f"{key} is not supported by lycolab: {reason}"
