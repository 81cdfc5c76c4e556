"""Step 05: every option of the old notebook's step 5, with its defaults, written as sd-scripts' two TOML files.

The form's names are the guide's (``network_category``, ``dataset_repeats``, ``num_epochs``,
``enable_sample_prompt`` …); this module maps them to sd-scripts keys, writes ``config/config_file.toml``,
``config/dataset_config.toml`` and ``config/sample_prompt.txt``, reads them back through the same validation
training uses, and shows how many steps that makes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lycolab.colab import Workspace
from lycolab.display import ShownAsTable, Table, one_line_errors

# The old notebook's network_category choices → (network_module, algo, uses conv layers)
NETWORK_CATEGORIES = {
    "LoRA": ("networks.lora", "lora", False),
    "LoCon": ("networks.lora", "lora", True),
    "LoCon_Lycoris": ("lycoris.kohya", "locon", True),
    "LoHa": ("lycoris.kohya", "loha", True),
    "LoKr": ("lycoris.kohya", "lokr", True),
}
DEFAULT_SAMPLE_PROMPT = ("masterpiece, best quality, {trigger} --n lowres, bad anatomy, blurry "
                         "--w 512 --h 512 --l 7 --s 28")


@dataclass
class TrainingPlan(ShownAsTable):
    """What the written configuration will do, shown before anyone waits an hour."""

    config_file: Path
    dataset_config: Path
    images: int
    images_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    network: str

    def table(self) -> Table:
        notes = [f"written: {self.config_file}, {self.dataset_config}"]
        if not 1000 <= self.images_per_epoch * self.epochs <= 3000:
            notes.append(f"images × repeats × epochs = {self.images_per_epoch * self.epochs}; the guide suggests "
                         "1000–3000 in total (change dataset_repeats or num_epochs)")
        return Table([{"images": self.images, "per epoch (with repeats)": self.images_per_epoch,
                       "steps per epoch": self.steps_per_epoch, "epochs": self.epochs, "total steps": self.total_steps,
                       "network": self.network}], title="training plan", notes=notes)


def _network(category: str, network_dim: int, network_alpha: float, conv_dim: int, conv_alpha: float
             ) -> dict[str, object]:
    if category not in NETWORK_CATEGORIES:
        raise ValueError(f"network_category must be one of {', '.join(NETWORK_CATEGORIES)} (got {category!r})")
    module, algo, convolutions = NETWORK_CATEGORIES[category]
    args = [f"algo={algo}"] if module == "lycoris.kohya" else []
    if convolutions:
        args += [f"conv_dim={conv_dim}", f"conv_alpha={conv_alpha}"]
    return {"network_module": module, "network_dim": network_dim, "network_alpha": network_alpha,
            "network_args": args}


# The model form's choices → (v2, v_parameterization); "auto" keeps what step 02 found.
MODEL_VERSIONS = {"SD 1.x": (False, False), "SD 2.x (512, base)": (True, False),
                  "SD 2.x (768, v-prediction)": (True, True)}


def _model_version(workspace: Workspace, model_version: str) -> tuple[bool, bool]:
    if model_version == "auto":
        return bool(workspace.recall("v2", False)), bool(workspace.recall("v_parameterization", False))
    if model_version not in MODEL_VERSIONS:
        raise ValueError(f"model_version must be auto or one of {', '.join(MODEL_VERSIONS)} (got {model_version!r})")
    return MODEL_VERSIONS[model_version]


def _optional(value: float | int) -> float | int | None:
    """Forms cannot leave a number empty: 0 (or -1 for the seed) means "not set"."""
    return value if value and value > 0 else None


@one_line_errors
def configure(workspace: Workspace, *, model_version: str = "auto", pretrained_model_name_or_path: str = "",
              vae: str = "",
              dataset_repeats: int = 10, caption_extension: str = "", resolution: int = 512, flip_aug: bool = False,
              keep_tokens: int = 0, shuffle_caption: bool = True, enable_bucket: bool = True,
              min_bucket_reso: int = 256, max_bucket_reso: int = 1024, bucket_no_upscale: bool = False,
              network_category: str = "LoCon_Lycoris", network_dim: int = 32, network_alpha: float = 16,
              conv_dim: int = 8, conv_alpha: float = 4, unet_lr: float = 1e-4, text_encoder_lr: float = 5e-5,
              network_train_unet_only: bool = False, optimizer_type: str = "AdamW8bit", optimizer_args: str = "",
              lr_scheduler: str = "constant", lr_warmup_steps: int = 0, lr_scheduler_num_cycles: int = 1,
              num_epochs: int = 10, train_batch_size: int = 6, mixed_precision: str = "fp16",
              save_precision: str = "fp16", save_every_n_epochs: int = 1, save_state: bool = False,
              max_token_length: int = 225, clip_skip: int = 2, gradient_checkpointing: bool = False,
              gradient_accumulation_steps: int = 1, seed: int = -1, lowram: bool = True, xformers: bool = True,
              cache_latents: bool = True, noise_offset: float = 0.0, min_snr_gamma: float = 0.0,
              enable_sample_prompt: bool = True, sampler: str = "euler_a", sample_prompts: str = "",
              output_name: str = "", training_comment: str = "") -> TrainingPlan:
    """Write both TOML files (and the sample prompts) from the form, validate them and return the plan."""
    from lycolab.config import load_config, write_config_file, write_dataset_config
    from lycolab.data.buckets import bucket_range_including
    from lycolab.data.report import folder_datasets

    model = pretrained_model_name_or_path.strip() or workspace.recall("model", "")
    if not model:
        raise ValueError("no base model: run step 02, or give pretrained_model_name_or_path")
    extension = caption_extension or workspace.recall("caption_extension", ".txt")
    datasets = folder_datasets(workspace.train_data, str(resolution), extension)
    for dataset in datasets:
        dataset.enable_bucket, dataset.bucket_no_upscale = enable_bucket, bucket_no_upscale
        dataset.min_bucket_reso, dataset.max_bucket_reso = bucket_range_including(
            dataset.resolution, min_bucket_reso, max_bucket_reso, dataset.bucket_reso_steps)
        dataset.subsets = [dataclasses.replace(
            subset, num_repeats=subset.num_repeats if _has_repeat_prefix(subset.image_dir) else dataset_repeats,
            shuffle_caption=shuffle_caption, keep_tokens=keep_tokens, flip_aug=flip_aug) for subset in dataset.subsets]
    dataset_file = write_dataset_config(datasets, workspace.dataset_config)
    prompt_file = _write_prompts(workspace, sample_prompts) if enable_sample_prompt else None
    v2, v_parameterization = _model_version(workspace, model_version)
    values = {
        "pretrained_model_name_or_path": model, "vae": vae.strip() or workspace.recall("vae", "") or None,
        "v2": v2, "v_parameterization": v_parameterization,
        **_network(network_category, network_dim, network_alpha, conv_dim, conv_alpha),
        "unet_lr": unet_lr, "text_encoder_lr": text_encoder_lr, "learning_rate": unet_lr,
        "network_train_unet_only": network_train_unet_only, "optimizer_type": optimizer_type,
        "optimizer_args": [item.strip() for item in optimizer_args.split() if item.strip()],
        "lr_scheduler": lr_scheduler, "lr_warmup_steps": lr_warmup_steps,
        "lr_scheduler_num_cycles": lr_scheduler_num_cycles, "dataset_config": str(dataset_file),
        "cache_latents": cache_latents, "output_dir": str(workspace.output), "logging_dir": str(workspace.logs),
        "output_name": output_name.strip() or workspace.name, "save_precision": save_precision,
        "save_every_n_epochs": _optional(save_every_n_epochs), "save_state": save_state,
        "train_batch_size": train_batch_size, "max_token_length": max_token_length if max_token_length > 75 else None,
        "xformers": xformers, "max_train_epochs": num_epochs, "seed": seed if seed >= 0 else None,
        "gradient_checkpointing": gradient_checkpointing, "gradient_accumulation_steps": gradient_accumulation_steps,
        "mixed_precision": mixed_precision, "clip_skip": _optional(clip_skip), "noise_offset": _optional(noise_offset),
        "min_snr_gamma": _optional(min_snr_gamma), "lowram": lowram, "training_comment": training_comment or None,
        "sample_every_n_epochs": _optional(save_every_n_epochs) if prompt_file else None,
        "sample_sampler": sampler, "sample_prompts": str(prompt_file) if prompt_file else None,
    }
    config = load_config(overrides={key: value for key, value in values.items() if value is not None})
    config_file = write_config_file(config, workspace.config_file)
    return _plan(load_config(config_file), config_file, dataset_file, network_category)


def _has_repeat_prefix(folder: str) -> bool:
    from lycolab.data.scan import parse_repeat_folder

    return parse_repeat_folder(Path(folder).name) is not None


def _write_prompts(workspace: Workspace, sample_prompts: str) -> Path:
    from lycolab.config import atomic_write_text

    text = sample_prompts.strip() or DEFAULT_SAMPLE_PROMPT.format(trigger=workspace.recall("trigger_word", ""))
    return atomic_write_text(workspace.config / "sample_prompt.txt", text.replace("\\n", "\n") + "\n")


def _plan(config, config_file: Path, dataset_file: Path, category: str) -> TrainingPlan:
    from lycolab.data.dataset import BucketedDataset
    from lycolab.training.loop import plan_run

    dataset = BucketedDataset(config.datasets, config.train_batch_size)
    plan = plan_run(config, dataset)
    return TrainingPlan(config_file, dataset_file, len(dataset), dataset.num_images_with_repeats(),
                        plan.steps_per_epoch, plan.epochs, plan.total_steps,
                        f"{category} dim {config.network_dim} alpha {config.network_alpha}")
