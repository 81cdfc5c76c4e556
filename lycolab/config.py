"""One typed configuration, read from and written to sd-scripts' two TOML files.

Users come with ``config_file.toml`` and ``dataset_config.toml`` written by the old Kohya notebook, and expect the ones
we write to run unchanged in sd-scripts. So names and meanings are sd-scripts' own; sections of ``config_file.toml``
are flattened exactly as sd-scripts flattens them (the section names do not matter). Validation happens here, once,
so a typo fails in a second with the key and file named instead of an hour into training.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import reprlib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Colab and this project run 3.11+, tomli is the same parser
    import tomli as tomllib

import tomli_w

from lycolab.files import atomic_write

logger = logging.getLogger(__name__)

MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("float", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "adafactor")
MAX_TOKEN_LENGTHS = (75, 150, 225)
NETWORK_MODULES = ("networks.lora", "lycoris.kohya")
ALGORITHMS = ("lora", "locon", "loha", "lokr")
# Upper bounds that keep later code finite: bucket lists are enumerated step by step up to max_bucket_reso, and every
# image's index is repeated num_repeats times per epoch. Both are far beyond what SD 1.x/2.x training uses.
MAX_RESOLUTION = 8192
MAX_REPEATS = 10_000
# TOML integers are 64-bit; Python would take any size, and torch/numpy would then fail far from the config.
INT_RANGE = (-(2**63), 2**63 - 1)
# accelerate's set_seed seeds numpy too, which takes 0 … 2**32 - 1 only.
SEED_RANGE = (0, 2**32 - 1)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the file and the fix."""


@dataclass
class SubsetConfig:
    """One folder of images (``[[datasets.subsets]]``)."""

    image_dir: str
    num_repeats: int = 1
    class_tokens: str | None = None
    is_reg: bool = False
    caption_extension: str = ".caption"
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: list[str] | None = None


@dataclass
class DatasetConfig:
    """One ``[[datasets]]`` entry: images sharing a resolution, bucketing and batch size."""

    subsets: list[SubsetConfig] = field(default_factory=list)
    resolution: tuple[int, int] = (512, 512)
    batch_size: int | None = None
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass
class TrainConfig:
    """Every ``config_file.toml`` key lycolab understands, with sd-scripts' names and defaults."""

    # model
    pretrained_model_name_or_path: str | None = None
    v2: bool = False
    v_parameterization: bool = False
    vae: str | None = None
    # lycolab's own: the diffusers folder/hub id with configs for a single-file checkpoint (needed offline only)
    model_config: str | None = None
    # network
    network_module: str = "networks.lora"
    network_dim: int | None = None
    network_alpha: float = 1.0
    network_args: list[str] = field(default_factory=list)
    network_weights: str | None = None
    network_dropout: float | None = None
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    no_metadata: bool = False
    training_comment: str | None = None
    # optimizer
    optimizer_type: str = ""
    learning_rate: float = 2e-6
    max_grad_norm: float = 1.0
    optimizer_args: list[str] = field(default_factory=list)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    # dataset arguments given in config_file.toml (used when no dataset_config is given)
    dataset_config: str | None = None
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    resolution: str | None = None
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    vae_batch_size: int = 1
    debug_dataset: bool = False
    max_data_loader_n_workers: int = 8
    persistent_data_loader_workers: bool = False
    # training
    output_dir: str | None = None
    output_name: str | None = None
    save_precision: str | None = None
    save_model_as: str = "safetensors"
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_epochs_state: int | None = None  # sd-scripts: states kept; unset = save_last_n_epochs
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    # a *-state folder, or "latest" for the newest one of this output_name in output_dir (none: start fresh)
    resume: str | None = None
    train_batch_size: int = 1
    max_token_length: int | None = None
    mem_eff_attn: bool = False
    xformers: bool = False
    sdpa: bool = False
    max_train_epochs: int | None = None
    max_train_steps: int = 1600
    seed: int | None = None
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    clip_skip: int | None = None
    logging_dir: str | None = None
    log_prefix: str | None = None
    noise_offset: float | None = None
    min_snr_gamma: float | None = None
    lowram: bool = False
    prior_loss_weight: float = 1.0
    # sampling
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_sampler: str = "euler_a"
    sample_prompts: str | None = None
    sample_at_first: bool = False
    # filled from dataset_config.toml (or train_data_dir); not a config_file.toml key
    datasets: list[DatasetConfig] = field(default_factory=list)


# Where each key goes when we write config_file.toml: the section names the old Kohya notebook used.
CONFIG_SECTIONS: dict[str, tuple[str, ...]] = {
    "model_arguments": ("pretrained_model_name_or_path", "v2", "v_parameterization", "vae", "model_config"),
    "additional_network_arguments": (
        "no_metadata", "unet_lr", "text_encoder_lr", "network_weights", "network_module", "network_dim",
        "network_alpha", "network_args", "network_dropout", "network_train_unet_only",
        "network_train_text_encoder_only", "training_comment",
    ),
    "optimizer_arguments": (
        "optimizer_type", "learning_rate", "max_grad_norm", "optimizer_args", "lr_scheduler", "lr_warmup_steps",
        "lr_scheduler_num_cycles", "lr_scheduler_power",
    ),
    "dataset_arguments": (
        "dataset_config", "train_data_dir", "reg_data_dir", "resolution", "caption_extension", "shuffle_caption",
        "keep_tokens", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
        "bucket_no_upscale", "cache_latents", "cache_latents_to_disk", "vae_batch_size", "debug_dataset",
        "max_data_loader_n_workers", "persistent_data_loader_workers",
    ),
    "training_arguments": (
        "output_dir", "output_name", "save_precision", "save_every_n_epochs", "save_every_n_steps",
        "save_last_n_epochs", "save_last_n_steps", "save_last_n_epochs_state",
        "save_last_n_steps_state", "save_state", "resume", "train_batch_size", "max_token_length",
        "mem_eff_attn", "xformers", "sdpa", "max_train_epochs",
        "max_train_steps", "seed", "gradient_checkpointing", "gradient_accumulation_steps", "mixed_precision",
        "clip_skip", "logging_dir", "log_prefix", "noise_offset", "min_snr_gamma", "lowram",
    ),
    "sample_prompt_arguments": ("sample_every_n_steps", "sample_every_n_epochs", "sample_sampler", "sample_prompts",
                                "sample_at_first"),
    "dreambooth_arguments": ("prior_loss_weight",),
    "saving_arguments": ("save_model_as",),
}

DATASET_KEYS = tuple(f.name for f in dataclasses.fields(DatasetConfig) if f.name != "subsets")
SUBSET_KEYS = tuple(f.name for f in dataclasses.fields(SubsetConfig))


# ----------------------------------------------------------------------------------------------------------- typing


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60
_SHORT_REPR.maxlist = _SHORT_REPR.maxdict = _SHORT_REPR.maxtuple = 4
_SHORT_REPR.maxlevel = 2


def shown(value: Any) -> str:
    """A user's value as an error message shows it: one line, at most about 60 characters, whatever its size.

    A 50 MB string, a list of a million items or a 10 000-digit integer must not turn a one-line error into pages.
    """
    try:
        return _SHORT_REPR.repr(value)
    except ValueError:  # an int beyond Python's int-to-str digit limit
        return f"an integer of {value.bit_length()} bits"


def plain(text: str) -> str:
    """A path or key name as typed when it is printable and not absurdly long, else :func:`shown`'s form."""
    return text if text.isprintable() and len(text) <= 240 else shown(text)


def _type_name(annotation: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    if origin is list:
        return "a list of strings"
    if origin is tuple:
        return "a size like 512 or [512, 768]"
    return names.get(annotation, str(annotation))


def _is_int(value: Any) -> bool:
    """A TOML integer: Python's bool is an int, TOML's is not; TOML integers are 64-bit."""
    return isinstance(value, int) and not isinstance(value, bool) and INT_RANGE[0] <= value <= INT_RANGE[1]


def _as_string(value: Any) -> str:
    """A string as given, or a number written as one (``output_name = 2024``); never NUL (no path may hold it)."""
    if isinstance(value, float) or _is_int(value):
        value = str(value)
    if not isinstance(value, str) or "\0" in value:
        raise TypeError
    return value


def _as_float(value: Any) -> float:
    """Ints are accepted for floats (sd-scripts does); NaN/inf never mean anything in a training option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        raise TypeError from None
    if not math.isfinite(number):
        raise TypeError
    return number


def _coerce(value: Any, annotation: Any) -> Any:
    """Return ``value`` as ``annotation`` or raise TypeError; only lossless conversions (int → float) are made."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for arg in typing.get_args(annotation):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is list:
        if isinstance(value, str):
            return _as_string(value).split()
        if isinstance(value, list):
            return [_as_string(item) for item in value]
        raise TypeError
    if origin is tuple:
        return parse_resolution(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if annotation is int:
        if _is_int(value):
            return value
        raise TypeError
    if annotation is float:
        return _as_float(value)
    if annotation is str:
        return _as_string(value)
    raise TypeError


def parse_resolution(value: Any) -> tuple[int, int]:
    """sd-scripts accepts ``512``, ``"512"``, ``"512,768"`` and ``[512, 768]`` (width, height); else TypeError."""
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        if len(parts) not in (1, 2) or not all(part.isascii() and part.isdigit() and len(part) < 19 for part in parts):
            raise TypeError
        value = [int(part) for part in parts]
    if isinstance(value, (list, tuple)) and len(value) in (1, 2) and all(_is_int(v) for v in value):
        return (value[0], value[-1])
    raise TypeError


def _typed(values: dict[str, Any], hints: dict[str, Any], source: str, where: str = "") -> dict[str, Any]:
    """Each value as its key's type, or a ConfigError naming the key (with its place in the file) and the file."""
    typed = {}
    for key, value in values.items():
        try:
            typed[key] = _coerce(value, hints[key])
        except TypeError:
            hint = "; TOML integers are 64-bit" if isinstance(value, int) and not isinstance(value, bool) else ""
            raise ConfigError(f"{source}: {where}{key} must be {_type_name(hints[key])}, got {shown(value)} "
                              f"({type(value).__name__}){hint}") from None
    return typed


def _fill(target_cls: type, values: dict[str, Any], source: str, where: str = "") -> Any:
    """Build a dataclass from a dict, naming the key and file on a type mismatch."""
    return target_cls(**_typed(values, typing.get_type_hints(target_cls), source, where))


# ------------------------------------------------------------------------------------------------------ config_file


def flatten_config_sections(document: dict[str, Any]) -> dict[str, Any]:
    """Flatten one level of sections, as sd-scripts' ``read_config_from_file`` does (section names are ignored)."""
    flat: dict[str, Any] = {}
    for name, value in document.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[name] = value
    return flat


def _exists(path: Path, kind: str = "file") -> bool:
    """``is_file``/``is_dir`` that answer False instead of raising for names the OS refuses (too long, NUL)."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except (OSError, ValueError):
        return False


def _read_toml(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not _exists(path):
        raise ConfigError(f"{path}: {what} not found; check the path (run the configure step first)")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({_first_line(error)}); fix the line it names") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); give the TOML {what} itself") from None
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply to be a {what}; fix the file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror}); check its permissions") from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _split_known(values: dict[str, Any], known: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    known_values = {key: value for key, value in values.items() if key in known}
    unknown = sorted(key for key in values if key not in known)
    return known_values, unknown


def _unknown_key_text(key: str, known: tuple[str, ...], where: str) -> str:
    """The key as the warning shows it, with the known key it was probably meant to be, or the file it belongs in."""
    name = where + plain(key)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if close:
        return f"{name} (did you mean {close[0]}?)"
    if known is not TRAIN_KEYS and key in TRAIN_KEYS:
        return f"{name} (a config_file.toml key)"
    if known is TRAIN_KEYS and key in DATASET_KEYS + SUBSET_KEYS:
        return f"{name} (a dataset_config.toml key)"
    return name


def _warn_unknown(unknown: list[str], source: str, known: tuple[str, ...], where: str = "") -> None:
    if unknown:
        logger.warning("%s: ignoring unknown keys: %s", source,
                       ", ".join(_unknown_key_text(key, known, where) for key in unknown))


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "datasets")


def parse_config_values(values: dict[str, Any], source: str) -> TrainConfig:
    """Typed TrainConfig from flat key/values; unknown keys get one warning, bad ones a ConfigError."""
    known, unknown = _split_known(values, TRAIN_KEYS)
    _warn_unknown(unknown, source, TRAIN_KEYS)
    return _fill(TrainConfig, known, source)


def read_config_file(path: str | Path) -> TrainConfig:
    """Read sd-scripts' ``config_file.toml`` (sections flattened) into a TrainConfig, without datasets."""
    return parse_config_values(flatten_config_sections(_read_toml(path, "config file")), str(path))


def _toml_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_file_document(config: TrainConfig) -> dict[str, dict[str, Any]]:
    """The sectioned dict we write; None values are left out (TOML has no null, sd-scripts uses its default)."""
    document: dict[str, dict[str, Any]] = {}
    for section, keys in CONFIG_SECTIONS.items():
        values = {key: _toml_value(getattr(config, key)) for key in keys if getattr(config, key) is not None}
        if values:
            document[section] = values
    return document


def write_config_file(config: TrainConfig, path: str | Path) -> Path:
    """Write ``config_file.toml`` that both lycolab and sd-scripts read."""
    return atomic_write_text(path, tomli_w.dumps(config_file_document(config)))


# --------------------------------------------------------------------------------------------------- dataset_config


def read_dataset_config(path: str | Path) -> list[DatasetConfig]:
    """Read ``dataset_config.toml``: ``[general]`` values cascade into datasets, dataset values into subsets.

    Every value is typed where it stands, so an error names its place (``datasets[0].subsets[1].num_repeats``).
    """
    source = str(path)
    document = _read_toml(path, "dataset config")
    top_level = ("general", "datasets")
    _warn_unknown(sorted(key for key in document if key not in top_level), source, top_level)
    general = _table(document.get("general", {}), "general", "[general]", source)
    general = _typed_level(general, DATASET_KEYS + SUBSET_KEYS, source, "general.")
    raw_datasets = _tables(document.get("datasets", []), "datasets", "[[datasets]]", source)
    if not raw_datasets:
        raise ConfigError(f"{source}: no [[datasets]] entry; add one with at least one [[datasets.subsets]] image_dir")
    return [_read_dataset(raw, general, source, index) for index, raw in enumerate(raw_datasets)]


_LEVEL_HINTS = {**typing.get_type_hints(DatasetConfig), **typing.get_type_hints(SubsetConfig)}


def _typed_level(values: dict[str, Any], known: tuple[str, ...], source: str, where: str) -> dict[str, Any]:
    """The known keys of one table, typed; unknown ones get one warning with close matches."""
    known_values, unknown = _split_known(values, known)
    _warn_unknown(unknown, source, known, where)
    return _typed(known_values, _LEVEL_HINTS, source, where)


def _table(value: Any, where: str, written: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {where} must be a table written {written}, got {shown(value)} "
                          f"({type(value).__name__})")
    return value


def _tables(value: Any, where: str, written: str, source: str) -> list[dict[str, Any]]:
    """An array of tables (``[[datasets]]``); a single table or any other value is an error naming the place."""
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {where} must be an array of tables written {written}, got {shown(value)} "
                          f"({type(value).__name__})")
    return [_table(item, f"{where}[{index}]", written, source) for index, item in enumerate(value)]


def _read_dataset(raw: dict[str, Any], general: dict[str, Any], source: str, index: int) -> DatasetConfig:
    where = f"datasets[{index}]."
    own = _typed_level({key: value for key, value in raw.items() if key != "subsets"}, DATASET_KEYS + SUBSET_KEYS,
                       source, where)
    inherited = {**general, **own}
    dataset = DatasetConfig(**{key: value for key, value in inherited.items() if key in DATASET_KEYS})
    subset_defaults = {key: value for key, value in inherited.items() if key in SUBSET_KEYS}
    raw_subsets = _tables(raw.get("subsets", []), f"{where}subsets", "[[datasets.subsets]]", source)
    if not raw_subsets:
        raise ConfigError(f"{source}: datasets[{index}] has no [[datasets.subsets]]; add one with image_dir")
    for subset_index, raw_subset in enumerate(raw_subsets):
        subset_where = f"{where}subsets[{subset_index}]."
        values = {**subset_defaults, **_typed_level(raw_subset, SUBSET_KEYS, source, subset_where)}
        if "image_dir" not in values:
            raise ConfigError(f"{source}: datasets[{index}].subsets[{subset_index}] has no image_dir; add image_dir")
        dataset.subsets.append(SubsetConfig(**values))
    return dataset


def dataset_config_document(datasets: list[DatasetConfig]) -> dict[str, Any]:
    """The dict we write: values shared by every dataset/subset go to ``[general]``, as the old notebook did."""
    subset_rows = [dataclasses.asdict(subset) for dataset in datasets for subset in dataset.subsets]
    dataset_rows = [{key: _toml_value(getattr(dataset, key)) for key in DATASET_KEYS} for dataset in datasets]
    general: dict[str, Any] = {}
    for rows, keys in ((dataset_rows, DATASET_KEYS), (subset_rows, SUBSET_KEYS)):
        for key in keys:
            values = [row[key] for row in rows]
            if key != "image_dir" and values and all(value == values[0] for value in values) and values[0] is not None:
                general[key] = values[0]
    document_datasets = []
    for dataset, dataset_row in zip(datasets, dataset_rows):
        entry = {k: v for k, v in dataset_row.items() if k not in general and v is not None}
        entry["subsets"] = [
            {k: v for k, v in dataclasses.asdict(subset).items() if k not in general and v is not None}
            for subset in dataset.subsets
        ]
        document_datasets.append(entry)
    return {"general": general, "datasets": document_datasets}


def write_dataset_config(datasets: list[DatasetConfig], path: str | Path) -> Path:
    """Write ``dataset_config.toml`` that both lycolab and sd-scripts read."""
    return atomic_write_text(path, tomli_w.dumps(dataset_config_document(datasets)))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text so that a crash never leaves a half-written config behind."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------- whole config


def network_args_dict(config: TrainConfig, source: str = "config") -> dict[str, str]:
    """``network_args = ["algo=loha", "conv_dim=8"]`` as a dict; a malformed item is an error."""
    parsed = {}
    for item in config.network_args:
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f'{source}: network_args item {shown(item)} must look like "key=value"')
        parsed[key.strip()] = value.strip()
    return parsed


def _existing_folder(config: TrainConfig, key: str, source: str) -> Path:
    folder = Path(getattr(config, key))
    _require(_exists(folder, "dir"), source,
             f"{key} {plain(str(folder))} is not a folder; fix the path or upload the images first")
    return folder


def datasets_from_config_args(config: TrainConfig, source: str) -> list[DatasetConfig]:
    """Without dataset_config.toml, sd-scripts builds one DreamBooth dataset from train_data_dir's N_name folders."""
    from lycolab.data.scan import discover_subsets

    if config.train_data_dir is None:
        raise ConfigError(f"{source}: neither dataset_config nor train_data_dir is set; set one of them")
    try:
        resolution = parse_resolution(config.resolution or "512")
    except TypeError:
        raise ConfigError(f"{source}: resolution must be a size like 512 or \"512,768\", got "
                          f"{shown(config.resolution)}") from None
    shared = dict(
        caption_extension=config.caption_extension,
        shuffle_caption=config.shuffle_caption,
        keep_tokens=config.keep_tokens,
    )
    subsets = [
        dataclasses.replace(subset, **shared)
        for subset in discover_subsets(_existing_folder(config, "train_data_dir", source), default_repeats=None)
    ]
    if config.reg_data_dir:
        subsets += [
            dataclasses.replace(subset, is_reg=True, **shared)
            for subset in discover_subsets(_existing_folder(config, "reg_data_dir", source), default_repeats=None)
        ]
    if not subsets:
        raise ConfigError(
            f"{source}: train_data_dir {plain(config.train_data_dir)} has no N_name folders with images "
            "(e.g. 10_mychar); rename the folder or use a dataset_config"
        )
    return [
        DatasetConfig(
            subsets=subsets,
            resolution=resolution,
            enable_bucket=config.enable_bucket,
            min_bucket_reso=config.min_bucket_reso,
            max_bucket_reso=config.max_bucket_reso,
            bucket_reso_steps=config.bucket_reso_steps,
            bucket_no_upscale=config.bucket_no_upscale,
        )
    ]


def _dataset_config_path(config: TrainConfig, config_file: str | Path | None, source: str) -> Path:
    """``dataset_config`` as given, else beside config_file.toml (the old notebook wrote relative names)."""
    dataset_path = Path(config.dataset_config)
    if config_file is not None and not dataset_path.is_absolute() and not _exists(dataset_path):
        dataset_path = Path(config_file).parent / dataset_path
    _require(_exists(dataset_path), source, f"dataset_config {plain(config.dataset_config)} not found; check the "
             "path (run the configure step first)")
    return dataset_path


def load_config(
    config_file: str | Path | None = None,
    dataset_config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Read both TOML files, apply overrides (CLI or notebook form) and validate everything once.

    Any value of any type ends as a typed config or a one-line ConfigError naming the key and the file: later code
    may rely on every field holding its declared type within the bounds checked here.
    """
    values: dict[str, Any] = {}
    source = str(config_file) if config_file else "arguments"
    if config_file is not None:
        values.update(flatten_config_sections(_read_toml(config_file, "config file")))
    if overrides:
        parse_config_values(overrides, "command-line arguments")  # names the right source for a bad override
        values.update({key: value for key, value in overrides.items() if key in TRAIN_KEYS})
    if dataset_config is not None:
        values["dataset_config"] = str(dataset_config)
    config = parse_config_values(values, source)
    validate_config(config, source)
    if config.dataset_config:
        dataset_path = _dataset_config_path(config, config_file, source)
        config.datasets = read_dataset_config(dataset_path)
        for dataset in config.datasets:
            validate_dataset(dataset, str(dataset_path))
    else:
        config.datasets = datasets_from_config_args(config, source)
        for dataset in config.datasets:
            validate_dataset(dataset, source)
    _require(not (config.cache_latents or config.cache_latents_to_disk)
             or not any(subset.random_crop for dataset in config.datasets for subset in dataset.subsets), source,
             "random_crop cannot be used with cache_latents: a cached latent holds one fixed crop, so the crop would "
             "never change; turn one of them off")
    return config


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{source}: {message}")


def _one_of(config: TrainConfig, key: str, allowed: tuple, source: str) -> None:
    value = getattr(config, key)
    _require(value in allowed, source, f"{key} must be one of {', '.join(map(str, allowed))} (got {shown(value)})")


def validate_config(config: TrainConfig, source: str) -> None:
    """Reject values that cannot work, naming the key; run before anything slow happens."""
    _require(config.network_dim is None or config.network_dim >= 1, source,
             f"network_dim must be at least 1 (got {config.network_dim}); 8-32 is typical")
    for key in ("network_alpha", "learning_rate", "unet_lr", "text_encoder_lr", "max_grad_norm", "lr_warmup_steps",
                "lr_scheduler_power", "prior_loss_weight", "max_data_loader_n_workers", "noise_offset"):
        value = getattr(config, key)
        _require(value is None or value >= 0, source, f"{key} must be >= 0 (got {value})")
    for key in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "vae_batch_size",
                "lr_scheduler_num_cycles"):
        _require(getattr(config, key) >= 1, source, f"{key} must be at least 1 (got {getattr(config, key)})")
    for key in ("max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
                "save_last_n_steps", "save_last_n_epochs_state", "save_last_n_steps_state", "sample_every_n_epochs",
                "sample_every_n_steps", "clip_skip"):
        value = getattr(config, key)
        _require(value is None or value >= 1, source, f"{key} must be at least 1 (got {value})")
    _require(config.network_dropout is None or 0 <= config.network_dropout < 1, source,
             f"network_dropout must be in [0, 1) (got {config.network_dropout}); 0.1 is typical")
    _require(config.seed is None or SEED_RANGE[0] <= config.seed <= SEED_RANGE[1], source,
             f"seed must be between 0 and 4294967295 (got {config.seed}); numpy and accelerate take no other")
    _one_of(config, "mixed_precision", MIXED_PRECISIONS, source)
    _require(config.save_precision is None or config.save_precision in SAVE_PRECISIONS, source,
             f"save_precision must be one of {', '.join(SAVE_PRECISIONS)} (got {shown(config.save_precision)})")
    _one_of(config, "lr_scheduler", LR_SCHEDULERS, source)
    _require(config.max_token_length is None or config.max_token_length in MAX_TOKEN_LENGTHS, source,
             f"max_token_length must be 75, 150 or 225 (got {config.max_token_length})")
    _require(config.save_model_as == "safetensors", source,
             f"save_model_as must be safetensors (got {shown(config.save_model_as)}); other formats are unsafe to "
             "load")
    _require(not (config.network_train_unet_only and config.network_train_text_encoder_only), source,
             "network_train_unet_only and network_train_text_encoder_only cannot both be true")
    _one_of(config, "network_module", NETWORK_MODULES, source)
    _validate_network_args(config, source)
    if config.min_snr_gamma is not None:
        _require(config.min_snr_gamma > 0, source,
                 f"min_snr_gamma must be > 0 (got {config.min_snr_gamma}); 5 is usual")
    _require(config.lr_scheduler != "adafactor" or config.optimizer_type.lower() == "adafactor", source,
             'lr_scheduler "adafactor" only works with optimizer_type = "AdaFactor"')


def _validate_network_args(config: TrainConfig, source: str) -> None:
    """network_args as create_network will read them; a number there is never NaN or infinite."""
    network_args = network_args_dict(config, source)
    for key, value in network_args.items():
        try:
            number = float(value)
        except ValueError:  # a word (algo=loha, use_tucker=true): checked by what reads it
            continue
        _require(math.isfinite(number), source, f"network_args {plain(key)} must be a finite number (got "
                 f"{shown(value)})")
    algo = network_args.get("algo", "lora")
    _require(algo in ALGORITHMS, source,
             f"network_args algo must be one of {', '.join(ALGORITHMS)} (got {shown(algo)})")
    from lycolab.networks.args import NetworkArgsError, network_kwargs, unknown_network_args

    try:
        network_kwargs(config.network_module, config.network_dim, config.network_alpha, network_args,
                       config.network_dropout)
    except NetworkArgsError as error:
        raise ConfigError(f"{source}: {_first_line(error)[:300]}") from None
    unknown = unknown_network_args(config.network_module, network_args)
    if unknown:
        logger.warning("%s: network_args not used by %s: %s", source, config.network_module,
                       ", ".join(map(plain, unknown)))


def _valid_caption_extension(extension: str) -> bool:
    """A suffix a file name can take (``.txt``, or ``txt`` as sd-scripts also accepts) and not a path."""
    try:
        Path("image.png").with_suffix(extension if extension.startswith(".") else "." + extension)
    except ValueError:
        return False
    return len(extension) <= 64


def validate_dataset(dataset: DatasetConfig, source: str) -> None:
    """Dataset values that cannot work: missing folders, sizes that buckets cannot be built from."""
    width, height = dataset.resolution
    _require(64 <= min(width, height) and max(width, height) <= MAX_RESOLUTION, source,
             f"resolution must be between 64 and {MAX_RESOLUTION} (got {width}x{height})")
    _require(dataset.bucket_reso_steps >= 8 and dataset.bucket_reso_steps % 8 == 0, source,
             f"bucket_reso_steps must be a positive multiple of 8 (got {dataset.bucket_reso_steps})")
    _require(0 < dataset.min_bucket_reso <= dataset.max_bucket_reso <= MAX_RESOLUTION, source,
             f"min_bucket_reso ({dataset.min_bucket_reso}) must be positive and <= max_bucket_reso "
             f"({dataset.max_bucket_reso}), which must be <= {MAX_RESOLUTION}")
    if dataset.enable_bucket:
        _validate_bucket_sizes(dataset, source)
    _require(dataset.batch_size is None or dataset.batch_size >= 1, source,
             f"batch_size must be at least 1 (got {dataset.batch_size})")
    for subset in dataset.subsets:
        validate_subset(subset, source)


def _validate_bucket_sizes(dataset: DatasetConfig, source: str) -> None:
    """sd-scripts' bucket asserts, checked here as well so that they name the file before any image is read.

    sd-scripts rounds min_bucket_reso down and max_bucket_reso up to whole steps (lycolab.data.buckets does the
    same, with a warning); the rounded range must hold the resolution, and the smallest bucket must be one step.
    """
    width, height = dataset.resolution
    steps = dataset.bucket_reso_steps
    low = dataset.min_bucket_reso - dataset.min_bucket_reso % steps
    high = dataset.max_bucket_reso + (-dataset.max_bucket_reso) % steps
    _require(low >= steps, source, f"min_bucket_reso must be at least bucket_reso_steps ({steps}), got "
             f"{dataset.min_bucket_reso}; 256 is usual")
    _require(low <= min(width, height) and max(width, height) <= high, source,
             f"resolution {width}x{height} must lie within min_bucket_reso and max_bucket_reso ({low} to {high} in "
             "whole bucket_reso_steps); change resolution or the bucket limits")


def validate_subset(subset: SubsetConfig, source: str) -> None:
    """One image folder's values: the folder exists, counts and rates are in range, unsupported options are off."""
    _require(_exists(Path(subset.image_dir), "dir"), source,
             f"image_dir {plain(subset.image_dir)} does not exist; fix the path or upload the images first")
    _require(1 <= subset.num_repeats <= MAX_REPEATS, source,
             f"num_repeats must be between 1 and {MAX_REPEATS} (got {subset.num_repeats}); for longer training "
             "raise max_train_epochs")
    _require(subset.keep_tokens >= 0, source, f"keep_tokens must be >= 0 (got {subset.keep_tokens})")
    _require(_valid_caption_extension(subset.caption_extension), source,
             f"caption_extension must be a file extension like .txt or .caption (got "
             f"{shown(subset.caption_extension)})")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        value = getattr(subset, key)
        _require(0.0 <= value <= 1.0, source, f"{key} must be between 0 and 1 (got {value})")
    _require(not subset.color_aug, source,
             "color_aug is not supported (it only shifts hue a little and rules out latent caching); remove it")
    _require(not subset.face_crop_aug_range, source,
             "face_crop_aug_range is not supported (it needs face positions in the file names); remove it")
