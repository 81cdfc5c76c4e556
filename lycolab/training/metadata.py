"""sd-scripts' training metadata, key for key, so A1111/ComfyUI/civitai show what a file was trained with.

Every ``ss_*`` and ``modelspec.*`` key is the one sd-scripts' ``train_network.py`` writes for the same run (its
``NetworkTrainer.train()`` builds the dict, ``save_model`` adds the per-save keys and ``get_sai_model_spec``'s
``modelspec.*``), with the same value formats: ``str()`` of each value (``None`` → ``"None"``, bools ``"True"``), JSON
where sd-scripts dumps JSON. Options lycolab does not offer are written with sd-scripts' defaults — the run trained
as sd-scripts does with them at their defaults. Where lycolab is not sd-scripts it says so: no sd-scripts commit
(``"(unknown)"``, sd-scripts' own value when it has none) and ``modelspec.implementation_version = "lycolab/<v>"``.

Only base names of folders and files are recorded, never absolute paths (they reveal user names and Drive layout).
Image counts and tag frequencies are over the images lycolab uses: sd-scripts counts every image file it finds and
would stop at one it cannot read, which lycolab skips.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lycolab.config import DatasetConfig, SubsetConfig, TrainConfig, network_args_dict, parse_resolution
from lycolab.data.dataset import BucketedDataset
from lycolab.data.scan import ImageRecord, scan_subset

if TYPE_CHECKING:
    from lycolab.training.loop import RunPlan

logger = logging.getLogger(__name__)

# (dataset index, subset, the subset's usable images), for every subset of the run
UsedImages = list[tuple[int, SubsetConfig, list[ImageRecord]]]

# train_network.py options the metadata records, at sd-scripts' argparse defaults: what is written for one that
# TrainConfig does not have (lycolab then trains as sd-scripts does at that default); a field of the name wins.
SD_SCRIPTS_DEFAULTS: dict[str, Any] = {
    "full_fp16": False, "multires_noise_iterations": None, "multires_noise_discount": 0.3,
    "adaptive_noise_scale": None, "zero_terminal_snr": False, "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0, "face_crop_aug_range": None,
    "scale_weight_norms": None, "ip_noise_gamma": None, "debiased_estimation_loss": False,
    "noise_offset_random_strength": False, "ip_noise_gamma_random_strength": False, "loss_type": "l2",
    "huber_schedule": "snr", "huber_scale": 1.0, "huber_c": 0.1, "fp8_base": False, "fp8_base_unet": False,
    "validation_seed": None, "validation_split": 0.0, "max_validation_steps": None, "validate_every_n_epochs": None,
    "validate_every_n_steps": None, "resize_interpolation": None, "color_aug": False, "flip_aug": False,
    "random_crop": False, "min_timestep": None, "max_timestep": None,
}
# What --no_metadata keeps (train_util.SS_METADATA_MINIMUM_KEYS); the modelspec.* keys are written either way.
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
NO_SD_SCRIPTS_COMMIT = "(unknown)"  # train_util.get_git_revision_hash() outside a git checkout
MODEL_SPEC_VERSION = "1.0.1"  # sai_model_spec.BASE_METADATA["modelspec.sai_model_spec"]
# metadata_* options that sai_model_spec.build_metadata takes by name; every other one becomes modelspec.<name>.
MODEL_SPEC_NAMED = ("title", "author", "description", "license", "tags")


def _option(config: TrainConfig, name: str) -> Any:
    return getattr(config, name, SD_SCRIPTS_DEFAULTS.get(name))


def _name(path: str) -> str:
    return Path(path).name


def _crop_range(value: Any) -> tuple[float, ...] | None:
    """face_crop_aug_range as prepare_dataset_args leaves it: ``"2.0,4.0"`` → ``(2.0, 4.0)``."""
    if not value:
        return None
    text = ",".join(value) if isinstance(value, (list, tuple)) else str(value)
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        return value


def new_session_id() -> int:
    """``random.randint(0, 2**32)`` as sd-scripts draws it, once per run."""
    return secrets.randbelow(2**32 + 1)


def lycolab_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lycolab")
    except PackageNotFoundError:
        from lycolab import __version__

        return __version__


# ------------------------------------------------------------------------------------------------ model hashes


def _read_hash(path: str, read) -> str:
    """sd-scripts' answers when a path is no file: "NOFILE", and "IsADirectory" for a (diffusers) folder."""
    try:
        with open(path, "rb") as handle:
            return read(handle)
    except FileNotFoundError:
        return "NOFILE"
    except (IsADirectoryError, PermissionError):
        return "IsADirectory"


def legacy_model_hash(path: str) -> str:
    """A1111's old model hash (``train_util.model_hash``): 8 hex digits of SHA-256 over 64 KiB at 1 MiB."""
    def read(handle) -> str:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]

    return _read_hash(path, read)


def file_sha256(path: str) -> str:
    """A1111's new model hash (``train_util.calculate_sha256``): SHA-256 of the whole file."""
    def read(handle) -> str:
        digest = hashlib.sha256()
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
        return digest.hexdigest()

    return _read_hash(path, read)


def model_keys(path: str | None, kind: str) -> dict[str, str]:
    """``ss_<kind>_name`` (and for a path on disk ``ss_<kind>_hash``/``ss_new_<kind>_hash``), as train() writes
    them for ``sd_model`` and ``vae``. A hub id is written as given; a path only by its base name."""
    if path is None:
        return {}
    if not os.path.exists(path):
        return {f"ss_{kind}_name": _name(path) if os.path.isabs(path) else path}
    logger.info("hashing %s for the metadata", _name(path))
    return {f"ss_{kind}_hash": legacy_model_hash(path), f"ss_new_{kind}_hash": file_sha256(path),
            f"ss_{kind}_name": _name(path)}


# ----------------------------------------------------------------------------------------------------- datasets


def _used_images(dataset: BucketedDataset) -> UsedImages:
    """(dataset index, subset, its usable images) for every subset: what sd-scripts counts per subset (all images
    found, regularisation images beyond what balancing takes included), less the files lycolab skipped."""
    skipped = {text.split(": ", 1)[0] for text in dataset.skipped}
    return [(index, subset, [record for record in scan_subset(subset)
                             if record.problem is None and str(record.path) not in skipped])
            for index, config in enumerate(dataset.datasets) for subset in config.subsets]


def tag_frequency(subsets: list[tuple[SubsetConfig, list[ImageRecord]]]) -> dict[str, dict[str, int]]:
    """Tag counts per folder base name over every image's caption as read (``BaseDataset.set_tag_frequency``):
    comma-separated, stripped, lower-cased; folders sharing a base name share one count."""
    frequency: dict[str, dict[str, int]] = {}
    for subset, records in subsets:
        counts = frequency.setdefault(_name(subset.image_dir), {})
        for record in records:
            for tag in record.caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return frequency


def bucket_info(dataset: BucketedDataset, index: int) -> dict[str, Any] | None:
    """``BaseDataset.bucket_info`` of one dataset: buckets in resolution order with their counts (repeats
    included), and the mean aspect-ratio error of its images (without repeats); None without bucketing."""
    if not dataset.datasets[index].enable_bucket:
        return None
    counts = [(resolution, count) for (owner, resolution), count in dataset.bucket_counts().items() if owner == index]
    errors = [abs(item.bucket.aspect_ratio_error) for item in dataset.items if item.dataset_index == index]
    return {"buckets": {position: {"resolution": resolution, "count": count}
                        for position, (resolution, count) in enumerate(counts)},
            "mean_img_ar_error": float(np.mean(np.array(errors))) if errors else 0}


def _bucket_limits(config: DatasetConfig) -> tuple[int | None, int | None]:
    """min/max_bucket_reso rounded to whole steps as the dataset uses them; None without bucketing."""
    if not config.enable_bucket:
        return None, None
    steps = config.bucket_reso_steps
    return config.min_bucket_reso - config.min_bucket_reso % steps, config.max_bucket_reso + (
        -config.max_bucket_reso) % steps


def _unique_name(name: str, taken: dict) -> str:
    """``name``, or ``name (2)``, ``name (3)`` … when taken: sd-scripts' names for folders sharing a base name."""
    unique, number = name, 2
    while unique in taken:
        unique, number = f"{name} ({number})", number + 1
    return unique


def _repeated(entries: list[tuple[SubsetConfig, list[ImageRecord]]], is_reg: bool) -> int:
    return sum(subset.num_repeats * len(records) for subset, records in entries if subset.is_reg == is_reg)


def _subset_entry(subset: SubsetConfig, records: list[ImageRecord]) -> dict[str, Any]:
    return {
        "img_count": len(records), "num_repeats": subset.num_repeats, "color_aug": bool(subset.color_aug),
        "flip_aug": bool(subset.flip_aug), "random_crop": bool(subset.random_crop),
        "shuffle_caption": bool(subset.shuffle_caption), "keep_tokens": subset.keep_tokens,
        "keep_tokens_separator": subset.keep_tokens_separator,
        "secondary_separator": getattr(subset, "secondary_separator", None),
        "enable_wildcard": bool(getattr(subset, "enable_wildcard", False)), "caption_prefix": subset.caption_prefix,
        "caption_suffix": subset.caption_suffix, "resize_interpolation": getattr(subset, "resize_interpolation", None),
        "image_dir": _name(subset.image_dir), "class_tokens": subset.class_tokens, "is_reg": subset.is_reg,
    }


def _dataset_entry(dataset: BucketedDataset, index: int, entries: list[tuple[SubsetConfig, list[ImageRecord]]]
                   ) -> dict[str, Any]:
    config = dataset.datasets[index]
    low, high = _bucket_limits(config)
    return {
        "is_dreambooth": True, "batch_size_per_device": dataset.batch_sizes[index],
        "num_train_images": _repeated(entries, False), "num_reg_images": _repeated(entries, True),
        "resolution": tuple(config.resolution), "enable_bucket": bool(config.enable_bucket), "min_bucket_reso": low,
        "max_bucket_reso": high, "tag_frequency": tag_frequency(entries), "bucket_info": bucket_info(dataset, index),
        "resize_interpolation": getattr(config, "resize_interpolation", None),
        "subsets": [_subset_entry(subset, records) for subset, records in entries if records],
    }


def dataset_config_keys(dataset: BucketedDataset, images: UsedImages) -> dict[str, str]:
    """With a dataset config: ``ss_datasets`` (one entry per dataset) and the merged ``ss_tag_frequency`` and
    ``ss_dataset_dirs`` (training folders only, clashing base names numbered; the first dataset's tags win)."""
    datasets, frequency, dirs = [], {}, {}
    for index in range(len(dataset.datasets)):
        entries = [(subset, records) for owner, subset, records in images if owner == index]
        entry = _dataset_entry(dataset, index, entries)
        datasets.append(entry)
        for subset, records in entries:
            if records and not subset.is_reg:
                dirs[_unique_name(_name(subset.image_dir), dirs)] = {"n_repeats": subset.num_repeats,
                                                                     "img_count": len(records)}
        for folder, counts in entry["tag_frequency"].items():
            frequency.setdefault(folder, counts)
    return {"ss_datasets": json.dumps(datasets), "ss_tag_frequency": json.dumps(frequency),
            "ss_dataset_dirs": json.dumps(dirs)}


def train_data_dir_keys(config: TrainConfig, dataset: BucketedDataset, images: UsedImages, processes: int
                        ) -> dict[str, Any]:
    """With train_data_dir (no dataset config): sd-scripts' flat keys for its one dataset."""
    first = dataset.datasets[0]
    entries = [(subset, records) for _, subset, records in images]
    dirs: dict[str, dict] = {}
    reg_dirs: dict[str, dict] = {}
    for subset, records in entries:
        if records:
            taken = reg_dirs if subset.is_reg else dirs
            taken[_unique_name(_name(subset.image_dir), taken)] = {"n_repeats": subset.num_repeats,
                                                                   "img_count": len(records)}
    low, high = _bucket_limits(first)
    return {
        "ss_batch_size_per_device": config.train_batch_size,
        "ss_total_batch_size": config.train_batch_size * processes * config.gradient_accumulation_steps,
        "ss_resolution": tuple(first.resolution), "ss_color_aug": bool(_option(config, "color_aug")),
        "ss_flip_aug": bool(_option(config, "flip_aug")), "ss_random_crop": bool(_option(config, "random_crop")),
        "ss_shuffle_caption": bool(config.shuffle_caption), "ss_enable_bucket": bool(first.enable_bucket),
        "ss_bucket_no_upscale": bool(first.enable_bucket and first.bucket_no_upscale), "ss_min_bucket_reso": low,
        "ss_max_bucket_reso": high, "ss_keep_tokens": config.keep_tokens, "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs), "ss_tag_frequency": json.dumps(tag_frequency(entries)),
        "ss_bucket_info": json.dumps(bucket_info(dataset, 0)),
    }


# ------------------------------------------------------------------------------------------------ whole metadata


SDXL_MODEL_VERSION = "sdxl_base_v1-0"  # sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"  # sai_model_spec.ARCH_SD_XL_V1_BASE (v-prediction too)
SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"  # sai_model_spec.IMPL_STABILITY_AI


def model_version(config: TrainConfig) -> str:
    """``ss_base_model_version`` for SD 1.x/2.x: model_util.get_model_version_str_for_sd1_sd2 (sd_v1, sd_v2,
    sd_v2_v, sd_v1_v); an SDXL run writes :data:`SDXL_MODEL_VERSION` instead (the trainer sets it once the model
    is loaded)."""
    return ("sd_v2" if config.v2 else "sd_v1") + ("_v" if config.v_parameterization else "")


def _integral(value: float | None) -> float | int | None:
    """An integral alpha as sd-scripts prints it from a TOML integer or its default (``1``, not ``1.0``)."""
    return int(value) if value is not None and float(value).is_integer() else value


def network_args_json(config: TrainConfig) -> str:
    """``ss_network_args``: the key=value items as a JSON dict of strings, with the ``dropout`` key train() adds
    for LyCORIS (``network_dropout``) unless given."""
    arguments: dict[str, Any] = dict(network_args_dict(config))
    arguments.setdefault("dropout", config.network_dropout)
    return json.dumps(arguments)


def _uses_dataset_config(config: TrainConfig) -> bool:
    """sd-scripts' ``use_user_config``; datasets built in code (no train_data_dir) are a dataset config too."""
    return bool(config.dataset_config) or not config.train_data_dir or len(config.datasets) != 1


def training_metadata(config: TrainConfig, dataset: BucketedDataset, plan: RunPlan | None = None, processes: int = 1,
                      session_id: int | None = None, started_at: float | None = None) -> dict[str, str]:
    """The metadata fixed for the whole run, as train() builds it; :func:`save_metadata` adds the per-save keys."""
    if plan is None:
        from lycolab.training.loop import plan_run

        plan = plan_run(config, dataset, processes)
    images = _used_images(dataset)
    values: dict[str, Any] = {
        "ss_session_id": new_session_id() if session_id is None else session_id,
        "ss_training_started_at": time.time() if started_at is None else started_at,
        "ss_output_name": config.output_name, "ss_learning_rate": config.learning_rate,
        "ss_text_encoder_lr": config.text_encoder_lr, "ss_unet_lr": config.unet_lr,
        "ss_num_train_images": _repeated([(s, r) for _, s, r in images], False), "ss_num_validation_images": 0,
        "ss_num_reg_images": _repeated([(s, r) for _, s, r in images], True),
        "ss_num_batches_per_epoch": plan.batches_per_epoch, "ss_num_epochs": plan.epochs,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps, "ss_max_train_steps": plan.total_steps,
        "ss_lr_warmup_steps": config.lr_warmup_steps, "ss_lr_scheduler": config.lr_scheduler,
        "ss_network_module": config.network_module, "ss_network_dim": config.network_dim,
        "ss_network_alpha": _integral(config.network_alpha), "ss_network_dropout": config.network_dropout,
        "ss_mixed_precision": config.mixed_precision, "ss_full_fp16": bool(_option(config, "full_fp16")),
        "ss_v2": bool(config.v2), "ss_base_model_version": model_version(config), "ss_clip_skip": config.clip_skip,
        "ss_max_token_length": config.max_token_length,
        "ss_cache_latents": bool(config.cache_latents or config.cache_latents_to_disk), "ss_seed": config.seed,
        "ss_lowram": config.lowram, "ss_noise_offset": config.noise_offset,
        "ss_training_comment": config.training_comment, "ss_sd_scripts_commit_hash": NO_SD_SCRIPTS_COMMIT,
        "ss_optimizer": config.optimizer_type or "AdamW", "ss_max_grad_norm": config.max_grad_norm,
        "ss_prior_loss_weight": config.prior_loss_weight, "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_debiased_estimation": bool(_option(config, "debiased_estimation_loss")),
        "ss_fp8_base": bool(_option(config, "fp8_base")), "ss_fp8_base_unet": bool(_option(config, "fp8_base_unet")),
    }
    for name in ("multires_noise_iterations", "multires_noise_discount", "adaptive_noise_scale", "zero_terminal_snr",
                 "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                 "scale_weight_norms", "ip_noise_gamma", "noise_offset_random_strength",
                 "ip_noise_gamma_random_strength", "loss_type", "huber_schedule", "huber_scale", "huber_c",
                 "validation_seed", "validation_split", "max_validation_steps", "validate_every_n_epochs",
                 "validate_every_n_steps", "resize_interpolation"):
        values[f"ss_{name}"] = _option(config, name)
    values["ss_face_crop_aug_range"] = _crop_range(_option(config, "face_crop_aug_range"))
    if _uses_dataset_config(config):
        values.update(dataset_config_keys(dataset, images))
    else:
        values.update(train_data_dir_keys(config, dataset, images, processes))
    if config.network_args:
        values["ss_network_args"] = network_args_json(config)
    values.update(model_keys(config.pretrained_model_name_or_path, "sd_model"))
    values.update(model_keys(config.vae, "vae"))
    return {key: str(value) for key, value in values.items()}


def _optimizer_name(config: TrainConfig, optimizer_class: type) -> str:
    """``module.Class(key=value,…)`` from optimizer_args, without parentheses when there are none; for AdaFactor
    with ``relative_step`` added as get_optimizer adds it."""
    from lycolab.training.optim import parse_optimizer_args

    arguments = parse_optimizer_args(config.optimizer_args)
    if (config.optimizer_type or "").lower() == "adafactor":
        arguments.setdefault("relative_step", True)
    listed = ",".join(f"{key}={value}" for key, value in arguments.items())
    name = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    return f"{name}({listed})" if listed else name


def optimizer_metadata(config: TrainConfig, choice: Any) -> dict[str, str]:
    """``ss_optimizer`` (the builder's ``ss_optimizer`` when it gives one) and ``ss_lr_scheduler``; with AdaFactor's
    relative step, what get_optimizer changes: the scheduler becomes ``adafactor:<lr>`` and the lr keys None."""
    values = {"ss_optimizer": getattr(choice, "ss_optimizer", "") or _optimizer_name(config, type(choice.optimizer)),
              "ss_lr_scheduler": choice.forced_scheduler or config.lr_scheduler}
    if choice.forced_scheduler == "adafactor":
        values.update(ss_lr_scheduler=f"adafactor:{config.learning_rate}", ss_learning_rate="None",
                      ss_unet_lr="None")
    return values


def _spec_resolution(config: TrainConfig, sdxl: bool = False) -> str:
    """sai_model_spec.determine_resolution: config_file's resolution, else 1024 for SDXL, 768 for v2 +
    v-prediction, else 512."""
    try:
        width, height = parse_resolution(config.resolution) if config.resolution else (None, None)
    except TypeError:
        width = height = None
    if width is None:
        width = height = 1024 if sdxl else 768 if config.v2 and config.v_parameterization else 512
    return f"{width}x{height}"


def model_spec(config: TrainConfig, timestamp: float | None = None, sdxl: bool = False) -> dict[str, str]:
    """The ``modelspec.*`` keys get_sai_model_spec writes for a LoRA/LyCORIS network on SD 1.x/2.x or SDXL."""
    timestamp = time.time() if timestamp is None else timestamp
    given = {f.name[len("metadata_"):]: getattr(config, f.name) for f in fields(config)
             if f.name.startswith("metadata_") and getattr(config, f.name) is not None}
    architecture = ("stable-diffusion-v2-768-v" if config.v_parameterization else "stable-diffusion-v2-512"
                    ) if config.v2 else "stable-diffusion-v1"
    if sdxl:
        architecture = SDXL_ARCHITECTURE
    title = given["title"] if "title" in given else config.output_name
    if title is None:
        title = f"LoRA@{timestamp}"
    spec: dict[str, Any] = {
        "architecture": f"{architecture}/lora", "implementation": SDXL_IMPLEMENTATION if sdxl else "diffusers",
        "title": title, "resolution": _spec_resolution(config, sdxl), "sai_model_spec": MODEL_SPEC_VERSION,
        "description": given.get("description"), "author": given.get("author"),
        "date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(), "license": given.get("license"),
        "tags": given.get("tags"), "prediction_type": "v" if config.v_parameterization else "epsilon",
        "encoder_layer": config.clip_skip,
    }
    minimum, maximum = _option(config, "min_timestep"), _option(config, "max_timestep")
    if minimum is not None or maximum is not None:
        spec["timestep_range"] = f"{0 if minimum is None else minimum},{1000 if maximum is None else maximum}"
    spec.update({name: value for name, value in given.items() if name not in MODEL_SPEC_NAMED})
    spec.setdefault("implementation_version", f"lycolab/{lycolab_version()}")
    return {f"modelspec.{name}": str(value) for name, value in spec.items() if value is not None}


def save_metadata(config: TrainConfig, metadata: dict[str, str], epoch: int, step: int,
                  finished_at: float | None = None) -> dict[str, str]:
    """What one save writes (train_network's ``save_model``): the run's metadata with ``ss_training_finished_at``,
    ``ss_steps`` and ``ss_epoch`` — or with ``no_metadata`` only the keys a loader needs — plus ``modelspec.*``."""
    finished_at = time.time() if finished_at is None else finished_at
    if config.no_metadata:
        saved = {key: metadata[key] for key in MINIMUM_KEYS if key in metadata}
    else:
        saved = {**metadata, "ss_training_finished_at": str(finished_at), "ss_steps": str(step),
                 "ss_epoch": str(epoch)}
    sdxl = metadata.get("ss_base_model_version") == SDXL_MODEL_VERSION
    return {**saved, **model_spec(config, finished_at, sdxl)}
