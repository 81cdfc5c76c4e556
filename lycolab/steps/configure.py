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

# The old notebook's sd-scripts network_category choices → (network_module, algo, uses conv layers); the LyCORIS
# ones (LoCon_Lycoris, LoHa, LoKr, …) come from the algorithm registry (network_categories).
KOHYA_CATEGORIES = {
    "LoRA": ("networks.lora", "lora", False),
    "LoCon": ("networks.lora", "lora", True),
}
DEFAULT_SAMPLE_PROMPT = ("masterpiece, best quality, {trigger} --n lowres, bad anatomy, blurry "
                         "--w 512 --h 512 --l 7 --s 28")
# What the guide recommends for sd-scripts' LoRA/LoCon (LyCORIS algorithms carry their own in the registry).
KOHYA_RECOMMENDED_DIMS = {
    "LoRA": ((8, 128), "network_dim 32 with network_alpha 16 (alpha = dim/2); 8–128 are common"),
    "LoCon": ((8, 128), "network_dim 32 / alpha 16, conv_dim 8–16 / conv_alpha half of it"),
}


def network_categories() -> dict[str, tuple[str, str, bool]]:
    """Every network_category the form offers → (network_module, algo, uses conv layers), in menu order."""
    from lycolab.networks.registry import algorithms

    lycoris = {algorithm.category: ("lycoris.kohya", algorithm.category_algo or algorithm.name, algorithm.adapts_conv)
               for algorithm in algorithms().values() if algorithm.category}
    return {**KOHYA_CATEGORIES, **lycoris}


def recommended_dims(category: str) -> tuple[tuple[int, int], str]:
    """(network_dim range, the recommendation in words) for a network_category."""
    from lycolab.networks.registry import get_algorithm

    if category in KOHYA_RECOMMENDED_DIMS:
        return KOHYA_RECOMMENDED_DIMS[category]
    categories = network_categories()
    if category not in categories:
        return (1, 1024), ""
    algorithm = get_algorithm(categories[category][1])
    return algorithm.recommended_dims, algorithm.recommendation


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

    advice: list[str] = dataclasses.field(default_factory=list)

    def table(self) -> Table:
        notes = [f"written: {self.config_file}, {self.dataset_config}", *self.advice]
        if not 1000 <= self.images_per_epoch * self.epochs <= 3000:
            notes.append(f"images × repeats × epochs = {self.images_per_epoch * self.epochs}; the guide suggests "
                         "1000–3000 in total (change dataset_repeats or num_epochs)")
        return Table([{"images": self.images, "per epoch (with repeats)": self.images_per_epoch,
                       "steps per epoch": self.steps_per_epoch, "epochs": self.epochs, "total steps": self.total_steps,
                       "network": self.network}], title="training plan", notes=notes)


def _network(category: str, network_dim: int, network_alpha: float, conv_dim: int, conv_alpha: float,
             dora_wd: bool = False, network_args: str = "") -> dict[str, object]:
    """The network keys of the config; ``network_args`` adds LyCORIS/sd-scripts options written as
    ``key=value`` items (``preset=attn-mlp loraplus_lr_ratio=16``), checked later with everything else."""
    from lycolab.networks.registry import get_algorithm, option_types

    categories = network_categories()
    if category not in categories:
        raise ValueError(f"network_category must be one of {', '.join(categories)} (got {category!r})")
    module, algo, convolutions = categories[category]
    args = [f"algo={algo}"] if module == "lycoris.kohya" else []
    if convolutions:
        args += [f"conv_dim={conv_dim}", f"conv_alpha={conv_alpha}"]
    if dora_wd:
        if module != "lycoris.kohya" or "dora_wd" not in option_types(get_algorithm(algo).options_class):
            with_dora = [name for name, (kind, choice, _) in categories.items() if kind == "lycoris.kohya"
                         and "dora_wd" in option_types(get_algorithm(choice).options_class)]
            raise ValueError(f"dora_wd (DoRA) is not available for {category}; choose {', '.join(with_dora)}")
        args.append("dora_wd=True")
    extra = _argument_list(network_args, "network_args")
    given = {item.split("=", 1)[0].strip() for item in args}
    repeated = sorted(item.split("=", 1)[0].strip() for item in extra if item.split("=", 1)[0].strip() in given)
    if repeated:
        raise ValueError(f"network_args: {', '.join(repeated)} already come from the form's own fields; "
                         "set them there")
    return {"network_module": module, "network_dim": network_dim, "network_alpha": network_alpha,
            "network_args": args + extra}


@dataclass(frozen=True)
class ModelVersion:
    v2: bool = False
    v_parameterization: bool = False
    sdxl: bool = False
    zero_terminal_snr: bool = False


# The model form's choices; "auto" keeps what step 02 found.
MODEL_VERSIONS = {"SD 1.x": ModelVersion(), "SD 2.x (512, base)": ModelVersion(v2=True),
                  "SD 2.x (768, v-prediction)": ModelVersion(v2=True, v_parameterization=True),
                  "SDXL": ModelVersion(sdxl=True),
                  "SDXL (v-prediction, zero terminal SNR)": ModelVersion(v_parameterization=True, sdxl=True,
                                                                         zero_terminal_snr=True)}
# What "auto" (0 for numbers) means per family: SDXL trains at 1024 px in 512–2048 buckets, on the U-Net alone with
# its text encoders' outputs cached and gradient checkpointing (the plan that fits a 15 GB T4).
AUTO_SETTINGS = {
    False: {"resolution": 512, "min_bucket_reso": 256, "max_bucket_reso": 1024, "network_train_unet_only": False,
            "cache_text_encoder_outputs": False, "gradient_checkpointing": False},
    True: {"resolution": 1024, "min_bucket_reso": 512, "max_bucket_reso": 2048, "network_train_unet_only": True,
           "cache_text_encoder_outputs": True, "gradient_checkpointing": True},
}


def _model_version(workspace: Workspace, model_version: str) -> ModelVersion:
    if model_version == "auto":
        return ModelVersion(*(bool(workspace.recall(name, False)) for name in (
            "v2", "v_parameterization", "sdxl", "zero_terminal_snr")))
    if model_version not in MODEL_VERSIONS:
        raise ValueError(f"model_version must be auto or one of {', '.join(MODEL_VERSIONS)} (got {model_version!r})")
    return MODEL_VERSIONS[model_version]


def _check_family(model: str, version: ModelVersion) -> None:
    """The chosen model version against what the model's own files say (when they say it)."""
    from lycolab.models.detect import FAMILY_NAMES, SD1, SD2, SDXL, model_family

    family = model_family(model)
    chosen = SDXL if version.sdxl else SD2 if version.v2 else SD1
    if family is not None and family != chosen:
        raise ValueError(f"model_version is {FAMILY_NAMES[chosen]} but {model} is an {FAMILY_NAMES[family]} model; "
                         "choose auto")


def _resolved(name: str, value, version: ModelVersion):
    """A form value, or for "auto" (0 for numbers) the model family's default (:data:`AUTO_SETTINGS`)."""
    if isinstance(value, bool):
        return value
    if value in ("auto", 0, None):
        if name == "resolution" and version.v2 and version.v_parameterization:
            return 768
        return AUTO_SETTINGS[version.sdxl][name]
    if isinstance(value, str):
        if value not in ("yes", "no"):
            raise ValueError(f"{name} must be auto, yes or no (got {value!r})")
        return value == "yes"
    return value


def _optional(value: float | int) -> float | int | None:
    """Forms cannot leave a number empty: 0 (or -1 for the seed) means "not set"."""
    return value if value and value > 0 else None


def _argument_list(text: str, field: str = "optimizer_args") -> list[str]:
    """``weight_decay=0.1 betas=0.9,0.99`` (space-separated, as sd-scripts' command line), hollowstrawberry's
    ``decouple=True, weight_decay=0.01, betas=[0.9,0.999]``, or the old notebook's list form
    ``["decouple=True", "weight_decay=0.6"]`` pasted as is (``field`` names the form field in errors)."""
    import ast

    text = text.strip()
    if text.startswith("["):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"{field} {text!r}: not a readable list; write key=value items separated by "
                             'spaces, e.g. weight_decay=0.01 betas=0.9,0.99') from None
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return [item.strip() for item in items if item.strip()]
    return [item.strip().rstrip(",") for item in text.split() if item.strip().rstrip(",")]


def _clip_skip(clip_skip: int, version: ModelVersion) -> int | None:
    """0 = automatic: 2 for SD 1.x (the anime models' habit), 1 for SD 2.x (trained on the penultimate layer), not
    set for SDXL (which always uses its penultimate layers; sd-scripts warns when it is set)."""
    if clip_skip and clip_skip > 0:
        return clip_skip
    return None if version.sdxl else 1 if version.v2 else 2


def dim_advice(category: str, network_dim: int, network_alpha: float, conv_dim: int, sdxl: bool = False
               ) -> list[str]:
    """A note when dim or alpha is outside what is recommended for ``category`` (never an error: they are habits)."""
    (low, high), recommendation = recommended_dims(category)
    notes = []
    if sdxl and not 8 <= network_dim <= 32:
        notes.append(f"SDXL: network_dim {network_dim} — 8–32 is usual for SDXL (its layers are wider; a T4 fits "
                     "dim 32 at 1024 px with the SDXL defaults)")
    if not low <= network_dim <= high or network_alpha > network_dim:
        notes.append(f"{category}: network_dim {network_dim} / alpha {network_alpha:g} — recommended: "
                     f"{recommendation}")
    if category != "LoRA" and conv_dim > high:
        notes.append(f"{category}: conv_dim {conv_dim} is large — recommended: {recommendation}")
    return notes


def _regularization(workspace: Workspace, reg_images: str, class_prompt: str, reg_repeats: int, extension: str
                    ) -> list:
    """Subsets for regularization images (sd-scripts' is_reg): the folder given, or the workspace's ``reg_data/``.

    Images without a caption file are captioned with ``class_prompt`` (sd-scripts' class_tokens); ``N_name``
    folders keep their N repeats and "name" class, others repeat ``reg_repeats`` times.
    """
    from lycolab.data.scan import discover_subsets, list_images

    folder = Path(reg_images.strip()).expanduser() if reg_images.strip() else workspace.reg_data
    if not folder.is_dir():
        raise ValueError(f"{folder}: regularization folder not found; give a folder of images or leave it empty")
    if not any(list_images(sub) for sub in [folder, *folder.rglob("*")] if sub.is_dir()):
        if reg_images.strip():
            raise ValueError(f"{folder}: no images in the regularization folder")
        return []
    subsets = discover_subsets(folder, default_repeats=reg_repeats, class_tokens=class_prompt.strip() or None)
    return [dataclasses.replace(subset, is_reg=True, caption_extension=extension,
                                class_tokens=subset.class_tokens or class_prompt.strip() or None)
            for subset in subsets]


@one_line_errors
def configure(workspace: Workspace, *, model_version: str = "auto", pretrained_model_name_or_path: str = "",
              vae: str = "",
              dataset_repeats: int = 10, caption_extension: str = "", resolution: int = 0, flip_aug: bool = False,
              keep_tokens: int = 0, shuffle_caption: bool = True, enable_bucket: bool = True,
              min_bucket_reso: int = 0, max_bucket_reso: int = 0, bucket_no_upscale: bool = False,
              network_category: str = "LoCon_Lycoris", network_dim: int = 32, network_alpha: float = 16,
              conv_dim: int = 8, conv_alpha: float = 4, dora_wd: bool = False, network_args: str = "",
              unet_lr: float = 1e-4, text_encoder_lr: float = 5e-5,
              network_train_unet_only: bool | str = "auto", cache_text_encoder_outputs: bool | str = "auto",
              optimizer_type: str = "AdamW8bit", optimizer_args: str = "",
              lr_scheduler: str = "constant", lr_warmup_steps: int = 0, lr_scheduler_num_cycles: int = 1,
              num_epochs: int = 10, train_batch_size: int = 6, mixed_precision: str = "fp16",
              save_precision: str = "fp16", save_every_n_epochs: int = 1, save_state: bool = False,
              max_token_length: int = 225, clip_skip: int = 0, gradient_checkpointing: bool | str = "auto",
              gradient_accumulation_steps: int = 1, seed: int = -1, lowram: bool = True, xformers: bool = True,
              cache_latents: bool = True, noise_offset: float = 0.0, min_snr_gamma: float = 0.0,
              enable_sample_prompt: bool = True, sampler: str = "euler_a", sample_prompts: str = "",
              sample_prompt_lines: str = "", output_name: str = "", training_comment: str = "",
              vae_batch_size: int = 1, save_last_n_epochs: int = 0, save_last_n_epochs_state: int = 1,
              network_weights: str = "", reg_images: str = "", class_prompt: str = "", reg_repeats: int = 1,
              prior_loss_weight: float = 1.0) -> TrainingPlan:
    """Write both TOML files (and the sample prompts) from the form, validate them and return the plan.

    Where the form cannot say "not set", 0 means it (and -1 for the seed); ``clip_skip`` 0 and
    ``caption_extension`` "auto" pick per model and from step 04. ``resolution``, the bucket range (0),
    ``network_train_unet_only``, ``cache_text_encoder_outputs`` and ``gradient_checkpointing`` ("auto") follow the
    model family (:data:`AUTO_SETTINGS`: SDXL's differ). ``save_last_n_epochs_state`` defaults to 1: one state
    (enough to resume) instead of one per epoch on a 15 GB Drive.
    """
    from lycolab.config import load_config, write_config_file, write_dataset_config
    from lycolab.data.buckets import bucket_range_including
    from lycolab.data.report import folder_datasets

    model = pretrained_model_name_or_path.strip() or workspace.recall("model", "")
    if not model:
        raise ValueError("no base model: run step 02, or give pretrained_model_name_or_path")
    extension = caption_extension if caption_extension not in ("", "auto") else workspace.recall(
        "caption_extension", ".txt")
    version = _model_version(workspace, model_version)
    if model_version != "auto":
        _check_family(model, version)
    auto = {name: _resolved(name, value, version) for name, value in (
        ("resolution", resolution), ("min_bucket_reso", min_bucket_reso), ("max_bucket_reso", max_bucket_reso),
        ("network_train_unet_only", network_train_unet_only), ("gradient_checkpointing", gradient_checkpointing),
        ("cache_text_encoder_outputs", cache_text_encoder_outputs))}
    advice = []
    if auto["cache_text_encoder_outputs"] and shuffle_caption:
        shuffle_caption = False
        advice.append("captions are not shuffled: the text encoders' outputs are cached (set "
                      "cache_text_encoder_outputs to no to shuffle them)")
    resolution, min_bucket_reso, max_bucket_reso = auto["resolution"], auto["min_bucket_reso"], auto["max_bucket_reso"]
    datasets = folder_datasets(workspace.train_data, str(resolution), extension)
    regularization = _regularization(workspace, reg_images, class_prompt, reg_repeats, extension)
    for dataset in datasets:
        dataset.enable_bucket, dataset.bucket_no_upscale = enable_bucket, bucket_no_upscale
        dataset.min_bucket_reso, dataset.max_bucket_reso = bucket_range_including(
            dataset.resolution, min_bucket_reso, max_bucket_reso, dataset.bucket_reso_steps)
        dataset.subsets = [dataclasses.replace(
            subset, num_repeats=subset.num_repeats if _has_repeat_prefix(subset.image_dir) else dataset_repeats,
            shuffle_caption=shuffle_caption, keep_tokens=keep_tokens, flip_aug=flip_aug) for subset in dataset.subsets]
        dataset.subsets += regularization
    dataset_file = write_dataset_config(datasets, workspace.dataset_config)
    prompt_file = _write_prompts(workspace, sample_prompts, sample_prompt_lines) if enable_sample_prompt else None
    weights = Path(network_weights.strip()).expanduser() if network_weights.strip() else None
    if weights is not None and not weights.is_file():
        raise ValueError(f"network_weights {weights}: file not found; give the .safetensors adapter to continue from")
    values = {
        "pretrained_model_name_or_path": model, "vae": vae.strip() or workspace.recall("vae", "") or None,
        "v2": version.v2, "v_parameterization": version.v_parameterization,
        "zero_terminal_snr": version.zero_terminal_snr or None,
        **_network(network_category, network_dim, network_alpha, conv_dim, conv_alpha, dora_wd, network_args),
        "unet_lr": unet_lr, "text_encoder_lr": text_encoder_lr, "learning_rate": unet_lr,
        "network_train_unet_only": auto["network_train_unet_only"], "optimizer_type": optimizer_type,
        "cache_text_encoder_outputs": auto["cache_text_encoder_outputs"] or None,
        "optimizer_args": _argument_list(optimizer_args),
        "lr_scheduler": lr_scheduler, "lr_warmup_steps": lr_warmup_steps,
        "lr_scheduler_num_cycles": lr_scheduler_num_cycles, "dataset_config": str(dataset_file),
        "cache_latents": cache_latents, "output_dir": str(workspace.output), "logging_dir": str(workspace.logs),
        "output_name": output_name.strip() or workspace.name, "save_precision": save_precision,
        "save_every_n_epochs": _optional(save_every_n_epochs), "save_state": save_state,
        "train_batch_size": train_batch_size, "max_token_length": max_token_length if max_token_length > 75 else None,
        "xformers": xformers, "max_train_epochs": num_epochs, "seed": seed if seed >= 0 else None,
        "gradient_checkpointing": auto["gradient_checkpointing"],
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "mixed_precision": mixed_precision, "clip_skip": _clip_skip(clip_skip, version),
        "noise_offset": _optional(noise_offset), "vae_batch_size": vae_batch_size,
        "save_last_n_epochs": _optional(save_last_n_epochs),
        "save_last_n_epochs_state": _optional(save_last_n_epochs_state) if save_state else None,
        "network_weights": str(weights) if weights else None,
        "prior_loss_weight": prior_loss_weight if regularization else None,
        "min_snr_gamma": _optional(min_snr_gamma), "lowram": lowram, "training_comment": training_comment or None,
        "sample_every_n_epochs": _optional(save_every_n_epochs) if prompt_file else None,
        "sample_sampler": sampler, "sample_prompts": str(prompt_file) if prompt_file else None,
    }
    config = load_config(overrides={key: value for key, value in values.items() if value is not None})
    config_file = write_config_file(config, workspace.config_file)
    plan = _plan(load_config(config_file), config_file, dataset_file, network_category)
    plan.advice = advice + dim_advice(network_category, network_dim, network_alpha, conv_dim, version.sdxl)
    if regularization:
        plan.advice.append(f"{len(regularization)} regularization folder(s) (is_reg), prior_loss_weight "
                           f"{prior_loss_weight:g}: as in sd-scripts they are repeated to match the training images, "
                           "so an epoch has twice the steps")
    workspace.remember(caption_extension=extension)
    return plan


@one_line_errors
def estimate(workspace: Workspace, device: str = "T4"):
    """What the configuration written by :func:`configure` needs on ``device`` (``auto`` = this runtime's GPU):
    time per step, VRAM and whether it fits a Colab session — prepared on a CPU runtime, it is planned for the GPU
    step 06 will run on."""
    from lycolab.config import load_config
    from lycolab.estimate import estimate as estimate_run

    if not workspace.config_file.is_file():
        raise ValueError(f"{workspace.config_file} does not exist; run the cell above first")
    return estimate_run(load_config(workspace.config_file), None if device in ("", "auto") else device)


def _has_repeat_prefix(folder: str) -> bool:
    from lycolab.data.scan import parse_repeat_folder

    return parse_repeat_folder(Path(folder).name) is not None


def _write_prompts(workspace: Workspace, sample_prompts: str, sample_prompt_lines: str = "") -> Path:
    """``sample_prompt.txt``: the form's prompt (``\\n`` separates several) and the multi-line cell's lines; a
    default with the trigger word when both are empty."""
    from lycolab.config import atomic_write_text

    given = sample_prompts.replace("\\n", "\n").split("\n") + sample_prompt_lines.split("\n")
    lines = [line.strip() for line in given if line.strip()]
    text = "\n".join(lines) or DEFAULT_SAMPLE_PROMPT.format(trigger=workspace.recall("trigger_word", ""))
    return atomic_write_text(workspace.config / "sample_prompt.txt", text + "\n")


def _plan(config, config_file: Path, dataset_file: Path, category: str) -> TrainingPlan:
    from lycolab.data.dataset import BucketedDataset
    from lycolab.training.loop import plan_run

    dataset = BucketedDataset(config.datasets, config.train_batch_size)
    plan = plan_run(config, dataset)
    return TrainingPlan(config_file, dataset_file, len(dataset), dataset.num_images_with_repeats(),
                        plan.steps_per_epoch, plan.epochs, plan.total_steps,
                        f"{category} dim {config.network_dim} alpha {config.network_alpha}")
