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
# sd-scripts' get_scheduler_fix: transformers' schedules, diffusers' piecewise_constant and AdaFactor's own.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "adafactor", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant")
# transformers' other schedule names: get_scheduler_fix accepts them but passes arguments they do not take.
REFUSED_LR_SCHEDULERS = {
    "reduce_lr_on_plateau": "it steps on a validation loss, which is not computed, and sd-scripts passes it "
                            "num_warmup_steps, which it does not take",
    "cosine_warmup_with_min_lr": "sd-scripts passes it num_decay_steps, which it does not take; use "
                                 "cosine_with_min_lr",
    "greedy": "it steps on a loss metric, and sd-scripts passes it num_warmup_steps, which it does not take",
}
MAX_TOKEN_LENGTHS = (75, 150, 225)
NETWORK_MODULES = ("networks.lora", "lycoris.kohya")
# sd-scripts' sample_sampler names → the diffusers scheduler each one is
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}
SAMPLER_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2",
                   "k_dpm_2_a": "dpm_2_a", "euler a": "euler_a", "dpm++ 2m": "dpmsolver++"}
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
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_separator: str = ","
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
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
    dim_from_weights: bool = False  # sd-scripts: build the network from network_weights' dims
    base_weights: list[str] | None = None  # sd-scripts: adapters merged into the model before training
    base_weights_multiplier: list[str] | None = None  # their multipliers (numbers), default 1 each
    network_dropout: float | None = None
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    # sd-scripts' SDXL options (sdxl_train_util): each caption encoded once, before training (any model family here)
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    no_metadata: bool = False
    training_comment: str | None = None
    # sd-scripts' model-spec fields (sai_model_spec): written as modelspec.* into every saved file
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None
    metadata_usage_hint: str | None = None
    metadata_thumbnail: str | None = None
    metadata_merged_from: str | None = None
    metadata_trigger_phrase: str | None = None
    metadata_preprocessor: str | None = None
    metadata_is_negative_embedding: str | None = None
    # optimizer
    optimizer_type: str = ""
    learning_rate: float = 2e-6
    max_grad_norm: float = 1.0
    scale_weight_norms: float | None = None  # max-norm regularisation of each adapter's ΔW (0 / None: off)
    optimizer_args: list[str] = field(default_factory=list)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0  # steps, or a ratio (a float below 1) of the training steps
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    # optimizer and schedule options (sd-scripts)
    use_8bit_adam: bool = False  # sd-scripts' old flag: optimizer_type "AdamW8bit"
    use_lion_optimizer: bool = False  # sd-scripts' old flag: optimizer_type "Lion"
    lr_scheduler_type: str = ""  # a scheduler class: torch.optim.lr_scheduler.X or module.Class; replaces lr_scheduler
    lr_scheduler_args: list[str] = field(default_factory=list)  # "key=value", the value a Python literal
    lr_decay_steps: int | float = 0  # warmup_stable_decay's decay: steps, or a ratio of the training steps
    lr_scheduler_timescale: int | None = None  # inverse_sqrt (unset: lr_warmup_steps, or 10000 without warmup)
    lr_scheduler_min_lr_ratio: float | None = None  # cosine_with_min_lr and warmup_stable_decay
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
    # subset keys sd-scripts also takes here: for train_data_dir, and as the fallback of a dataset_config's subsets
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_separator: str = ","
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: list[str] | None = None
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
    save_state_on_train_end: bool = False  # sd-scripts: a state with the final save only
    save_n_epoch_ratio: int | None = None  # sd-scripts: save_every_n_epochs = floor(epochs / ratio), at least 1
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
    full_fp16: bool = False  # the adapter itself (and its gradients) in fp16/bf16, not only the activations
    full_bf16: bool = False
    clip_skip: int | None = None
    logging_dir: str | None = None
    log_prefix: str | None = None
    noise_offset: float | None = None
    min_snr_gamma: float | None = None
    lowram: bool = False
    # sd-scripts keeps the VAE in half precision unless this is set; lycolab's VAE always runs in float32
    no_half_vae: bool = False
    log_with: str | None = None  # sd-scripts: tensorboard, wandb or all; lycolab writes TensorBoard only
    prior_loss_weight: float = 1.0
    # noise and loss (sd-scripts' custom_train_functions)
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    zero_terminal_snr: bool = False
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    # lycolab's own: an unknown key only warns instead of stopping (sd-scripts' parser refuses one)
    allow_unknown_keys: bool | None = None
    # sampling
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_sampler: str = "ddim"  # sd-scripts' default; the notebook's form picks euler_a
    sample_prompts: str | None = None
    sample_at_first: bool = False
    # filled from dataset_config.toml (or train_data_dir); not a config_file.toml key
    datasets: list[DatasetConfig] = field(default_factory=list)


# Where each key goes when we write config_file.toml: the section names the old Kohya notebook used.
CONFIG_SECTIONS: dict[str, tuple[str, ...]] = {
    "model_arguments": ("pretrained_model_name_or_path", "v2", "v_parameterization", "vae", "model_config"),
    "additional_network_arguments": (
        "no_metadata", "unet_lr", "text_encoder_lr", "network_weights", "dim_from_weights", "base_weights",
        "base_weights_multiplier", "network_module", "network_dim",
        "network_alpha", "network_args", "network_dropout", "network_train_unet_only",
        "network_train_text_encoder_only", "training_comment", "metadata_title", "metadata_author",
        "metadata_description", "metadata_license", "metadata_tags", "metadata_usage_hint", "metadata_thumbnail",
        "metadata_merged_from", "metadata_trigger_phrase", "metadata_preprocessor", "metadata_is_negative_embedding",
    ),
    "optimizer_arguments": (
        "optimizer_type", "learning_rate", "max_grad_norm", "scale_weight_norms", "optimizer_args", "lr_scheduler",
        "lr_warmup_steps",
        "lr_scheduler_num_cycles", "lr_scheduler_power",
        # optimizer and schedule options (sd-scripts)
        "use_8bit_adam", "use_lion_optimizer", "lr_scheduler_type", "lr_scheduler_args", "lr_decay_steps",
        "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio",
    ),
    "dataset_arguments": (
        "dataset_config", "train_data_dir", "reg_data_dir", "resolution", "caption_extension", "shuffle_caption",
        "keep_tokens", "caption_prefix", "caption_suffix", "keep_tokens_separator", "secondary_separator",
        "enable_wildcard", "caption_separator", "caption_dropout_rate", "caption_dropout_every_n_epochs",
        "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step", "flip_aug", "color_aug", "random_crop",
        "face_crop_aug_range", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
        "bucket_no_upscale", "cache_latents", "cache_latents_to_disk", "vae_batch_size", "debug_dataset",
        "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
        "max_data_loader_n_workers", "persistent_data_loader_workers",
    ),
    "training_arguments": (
        "output_dir", "output_name", "save_precision", "save_every_n_epochs", "save_every_n_steps",
        "save_last_n_epochs", "save_last_n_steps", "save_last_n_epochs_state",
        "save_last_n_steps_state", "save_state", "save_state_on_train_end", "save_n_epoch_ratio",
        "resume", "train_batch_size", "max_token_length",
        "mem_eff_attn", "xformers", "sdpa", "max_train_epochs",
        "max_train_steps", "seed", "gradient_checkpointing", "gradient_accumulation_steps", "mixed_precision",
        "full_fp16", "full_bf16",
        "clip_skip", "logging_dir", "log_prefix", "noise_offset", "min_snr_gamma", "lowram", "no_half_vae",
        "log_with", "allow_unknown_keys",
        "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations", "multires_noise_discount",
        "ip_noise_gamma", "ip_noise_gamma_random_strength", "min_timestep", "max_timestep", "zero_terminal_snr",
        "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "loss_type",
        "huber_schedule", "huber_c", "huber_scale",
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


def _warn_unknown(unknown: list[str], source: str, known: tuple[str, ...], where: str = "",
                  allow_unknown_keys: bool | None = None) -> None:
    """An unknown key is an error naming it (with the key it was probably meant to be), as sd-scripts' argument
    parser and dataset schema refuse one; ``allow_unknown_keys`` turns that into one warning."""
    if not unknown:
        return
    named = ", ".join(_unknown_key_text(key, known, where) for key in unknown)
    if allow_unknown_keys:
        logger.warning("%s: ignoring unknown keys: %s", source, named)
        return
    raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {named}; fix or remove "
                      f"{'them' if len(unknown) > 1 else 'it'} (allow_unknown_keys = true only warns)")


def _refuse_unsupported(values: dict[str, Any], source: str, where: str = "") -> dict[str, Any]:
    """Values without the sd-scripts keys lycolab refuses (lycolab.unsupported), which may only be "off"."""
    from lycolab.unsupported import REFUSED_OPTIONS, refusal

    for key, value in values.items():
        reason = refusal(key, value)
        if reason is not None:
            raise ConfigError(f"{source}: {where}{reason}")
    return {key: value for key, value in values.items() if key not in REFUSED_OPTIONS}


# sd-scripts' misspelt spellings it still accepts → the key they mean
ALIASES = {"caption_extention": "caption_extension"}


def _unaliased(values: dict[str, Any]) -> dict[str, Any]:
    return {ALIASES.get(key, key) if ALIASES.get(key) not in values else key: value for key, value in values.items()}


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "datasets")


def parse_config_values(values: dict[str, Any], source: str, allow_unknown_keys: bool = False) -> TrainConfig:
    """Typed TrainConfig from flat key/values; a bad, refused or unknown key is a ConfigError naming it."""
    values = _refuse_unsupported(_unaliased(values), source)
    known, unknown = _split_known(values, TRAIN_KEYS)
    _warn_unknown(unknown, source, TRAIN_KEYS, allow_unknown_keys=allow_unknown_keys)
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


def read_dataset_config(path: str | Path, fallback: dict[str, Any] | None = None,
                        allow_unknown_keys: bool | None = None) -> list[DatasetConfig]:
    """Read ``dataset_config.toml``: ``[general]`` values cascade into datasets, dataset values into subsets.

    ``fallback`` holds the dataset and subset keys given in ``config_file.toml`` (or on the command line): as in
    sd-scripts, they apply wherever the dataset file does not set the key at any level. Every value is typed where
    it stands, so an error names its place (``datasets[0].subsets[1].num_repeats``).
    """
    source = str(path)
    document = _read_toml(path, "dataset config")
    top_level = ("general", "datasets")
    _warn_unknown(sorted(key for key in document if key not in top_level), source, top_level,
                  allow_unknown_keys=allow_unknown_keys)
    general = _table(document.get("general", {}), "general", "[general]", source)
    general = {**(fallback or {}), **_typed_level(general, DATASET_KEYS + SUBSET_KEYS, source, "general.",
                                                   allow_unknown_keys)}
    raw_datasets = _tables(document.get("datasets", []), "datasets", "[[datasets]]", source)
    if not raw_datasets:
        raise ConfigError(f"{source}: no [[datasets]] entry; add one with at least one [[datasets.subsets]] image_dir")
    return [_read_dataset(raw, general, source, index, allow_unknown_keys) for index, raw in enumerate(raw_datasets)]


_LEVEL_HINTS = {**typing.get_type_hints(DatasetConfig), **typing.get_type_hints(SubsetConfig)}


def _typed_level(values: dict[str, Any], known: tuple[str, ...], source: str, where: str,
                 allow_unknown_keys: bool | None = None) -> dict[str, Any]:
    """The known keys of one table, typed; a refused or unknown one is a ConfigError with close matches."""
    values = _refuse_unsupported(_unaliased(values), source, where)
    known_values, unknown = _split_known(values, known)
    _warn_unknown(unknown, source, known, where, allow_unknown_keys)
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


def _read_dataset(raw: dict[str, Any], general: dict[str, Any], source: str, index: int,
                  allow_unknown_keys: bool = False) -> DatasetConfig:
    where = f"datasets[{index}]."
    own = _typed_level({key: value for key, value in raw.items() if key != "subsets"}, DATASET_KEYS + SUBSET_KEYS,
                       source, where, allow_unknown_keys)
    inherited = {**general, **own}
    dataset = DatasetConfig(**{key: value for key, value in inherited.items() if key in DATASET_KEYS})
    subset_defaults = {key: value for key, value in inherited.items() if key in SUBSET_KEYS}
    raw_subsets = _tables(raw.get("subsets", []), f"{where}subsets", "[[datasets.subsets]]", source)
    if not raw_subsets:
        raise ConfigError(f"{source}: datasets[{index}] has no [[datasets.subsets]]; add one with image_dir")
    for subset_index, raw_subset in enumerate(raw_subsets):
        subset_where = f"{where}subsets[{subset_index}]."
        values = {**subset_defaults, **_typed_level(raw_subset, SUBSET_KEYS, source, subset_where,
                                                    allow_unknown_keys)}
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


def scheduler_args_dict(items: list[str], source: str = "config") -> dict[str, Any]:
    """``lr_scheduler_args = ["T_max=100", "step_rules='1:10,0.1'"]`` as sd-scripts' get_scheduler_fix reads them:
    one "=" per item and the value a Python literal (``ast.literal_eval``), so text needs quotes. What sd-scripts
    cannot read is an error here too: the config we write must run there unchanged."""
    import ast

    parsed: dict[str, Any] = {}
    for item in items:
        key, *values = item.split("=")
        if len(values) != 1 or not key.isidentifier():
            raise ConfigError(f'{source}: lr_scheduler_args item {shown(item)} must look like "key=value" (one "=", '
                              "a keyword name before it)")
        try:
            parsed[key] = ast.literal_eval(values[0])
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ConfigError(f"{source}: lr_scheduler_args {plain(key)} value {shown(values[0])} is not a Python "
                              f"literal (sd-scripts reads it with ast.literal_eval); quote text: {plain(key)}='...'"
                              ) from None
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
    # every subset key config_file.toml can hold, as sd-scripts' argparse values become the subsets' parameters
    shared = {key: getattr(config, key) for key in SUBSET_KEYS if key in TRAIN_KEYS}
    subsets = [
        dataclasses.replace(subset, **shared)
        for subset in discover_subsets(_existing_folder(config, "train_data_dir", source), default_repeats=None,
                                       recursive=False)
    ]
    if config.reg_data_dir:
        subsets += [
            dataclasses.replace(subset, is_reg=True, **shared)
            for subset in discover_subsets(_existing_folder(config, "reg_data_dir", source), default_repeats=None,
                                           recursive=False)
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
    allow = values.get("allow_unknown_keys") is True or (overrides or {}).get("allow_unknown_keys") is True
    if overrides:
        # names the right source for a bad override
        parse_config_values(overrides, "command-line arguments", allow_unknown_keys=allow)
        values.update({key: value for key, value in _unaliased(overrides).items() if key in TRAIN_KEYS})
    if dataset_config is not None:
        values["dataset_config"] = str(dataset_config)
    config = parse_config_values(values, source, allow_unknown_keys=allow)
    validate_config(config, source)
    if config.dataset_config:
        dataset_path = _dataset_config_path(config, config_file, source)
        given = {key: value for key, value in _unaliased(values).items()
                 if key in TRAIN_KEYS and key in DATASET_KEYS + SUBSET_KEYS}
        fallback = _typed(given, _LEVEL_HINTS, source, "") if given else {}
        config.datasets = read_dataset_config(dataset_path, fallback, allow)
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
    _check_text_encoder_cache_captions(config, source)
    return config


def _validate_text_encoder_cache(config: TrainConfig, source: str) -> None:
    """sd-scripts' rules (sdxl_train_network.py): ``_to_disk`` turns caching on; a cached output is the text
    encoders' and fixed, so they cannot be trained."""
    if config.cache_text_encoder_outputs_to_disk and not config.cache_text_encoder_outputs:
        logger.info("%s: cache_text_encoder_outputs_to_disk turns cache_text_encoder_outputs on", source)
        config.cache_text_encoder_outputs = True
    _require(not config.cache_text_encoder_outputs or config.network_train_unet_only, source,
             "cache_text_encoder_outputs needs network_train_unet_only = true: cached text-encoder outputs cannot "
             "train a text-encoder adapter")


def _check_text_encoder_cache_captions(config: TrainConfig, source: str) -> None:
    """A cached caption is encoded once, so captions must not change from one epoch to the next (sd-scripts:
    is_text_encoder_output_cacheable)."""
    if not config.cache_text_encoder_outputs:
        return
    for dataset in config.datasets:
        for subset in dataset.subsets:
            changing = [name for name in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate",
                                          "token_warmup_step", "caption_dropout_every_n_epochs",
                                          "enable_wildcard")
                        if getattr(subset, name)]
            _require(not changing, source, f"cache_text_encoder_outputs cannot be used with {', '.join(changing)} "
                     f"(subset {subset.image_dir}): a cached caption never changes; turn one of them off")


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
    for key in ("network_alpha", "learning_rate", "unet_lr", "text_encoder_lr", "max_grad_norm", "scale_weight_norms",
                "lr_warmup_steps",
                "lr_scheduler_power", "prior_loss_weight", "max_data_loader_n_workers", "noise_offset"):
        value = getattr(config, key)
        _require(value is None or value >= 0, source, f"{key} must be >= 0 (got {value})")
    for key in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "vae_batch_size"):
        _require(getattr(config, key) >= 1, source, f"{key} must be at least 1 (got {getattr(config, key)})")
    for key in ("max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
                "save_last_n_steps", "save_last_n_epochs_state", "save_last_n_steps_state", "save_n_epoch_ratio",
                "sample_every_n_epochs",
                "sample_every_n_steps", "clip_skip"):
        value = getattr(config, key)
        _require(value is None or value >= 1, source, f"{key} must be at least 1 (got {value})")
    _require(config.network_dropout is None or 0 <= config.network_dropout < 1, source,
             f"network_dropout must be in [0, 1) (got {config.network_dropout}); 0.1 is typical")
    _require(config.seed is None or SEED_RANGE[0] <= config.seed <= SEED_RANGE[1], source,
             f"seed must be between 0 and 4294967295 (got {config.seed}); numpy and accelerate take no other")
    _one_of(config, "mixed_precision", MIXED_PRECISIONS, source)
    for key, precision in (("full_fp16", "fp16"), ("full_bf16", "bf16")):  # sd-scripts' asserts
        _require(not getattr(config, key) or config.mixed_precision == precision, source,
                 f"{key} needs mixed_precision = \"{precision}\" (got {shown(config.mixed_precision)})")
    _require(config.save_precision is None or config.save_precision in SAVE_PRECISIONS, source,
             f"save_precision must be one of {', '.join(SAVE_PRECISIONS)} (got {shown(config.save_precision)})")
    _require(config.max_token_length is None or config.max_token_length in MAX_TOKEN_LENGTHS, source,
             f"max_token_length must be 75, 150 or 225 (got {config.max_token_length})")
    _require(not config.dim_from_weights or config.network_weights, source,
             "dim_from_weights needs network_weights (the file whose dims the network takes)")
    for index, value in enumerate(config.base_weights_multiplier or []):
        try:
            float(value)
        except ValueError:
            raise ConfigError(f"{source}: base_weights_multiplier[{index}] must be a number, got {shown(value)}") \
                from None
    for path in (config.base_weights or []) + ([config.network_weights] if config.network_weights else []):
        _require(_exists(Path(path)), source, f"{plain(path)}: adapter file not found (base_weights / "
                 "network_weights); check the path")
    _require(config.caption_separator != "", source, "caption_separator must not be empty; the default is \",\"")
    _require(config.log_with in (None, "tensorboard"), source,
             f"log_with must be tensorboard (got {shown(config.log_with)}): Weights & Biases is not supported; "
             "TensorBoard events go to logging_dir")
    _require(config.log_with is None or config.logging_dir, source,
             "log_with = tensorboard needs logging_dir (as in sd-scripts): set logging_dir to a folder")
    if config.save_model_as in ("ckpt", "pt"):
        logger.warning("%s: save_model_as = %s: writing .safetensors instead (a pickle can run code when it is "
                       "loaded; A1111, ComfyUI and diffusers read .safetensors)", source, config.save_model_as)
        config.save_model_as = "safetensors"
    _require(config.save_model_as == "safetensors", source,
             f"save_model_as must be safetensors (got {shown(config.save_model_as)}); other formats are unsafe to "
             "load")
    _require(not (config.network_train_unet_only and config.network_train_text_encoder_only), source,
             "network_train_unet_only and network_train_text_encoder_only cannot both be true")
    _validate_text_encoder_cache(config, source)
    _one_of(config, "network_module", NETWORK_MODULES, source)
    _validate_network_args(config, source)
    if config.min_snr_gamma is not None:
        _require(config.min_snr_gamma > 0, source,
                 f"min_snr_gamma must be > 0 (got {config.min_snr_gamma}); 5 is usual")
    _validate_noise_and_loss(config, source)
    _validate_optimizer_and_schedule(config, source)
    _validate_sampler(config, source)


def sampler_key(name: str) -> str:
    """A sample_sampler name (any case, an alias such as k_euler_a) as its key in ``SAMPLERS``."""
    return SAMPLER_ALIASES.get(name.lower(), name.lower())


def _validate_sampler(config: TrainConfig, source: str) -> None:
    """A sampler is checked at load time, not at the first sample after an epoch of training."""
    sampler = sampler_key(config.sample_sampler)
    _require(sampler in SAMPLERS, source, f"sample_sampler {shown(config.sample_sampler)} is not known; use one of "
             f"{', '.join(SAMPLERS)} (or k_lms, k_euler, k_euler_a, k_dpm_2, k_dpm_2_a)")
    sampling = config.sample_every_n_epochs or config.sample_every_n_steps or config.sample_at_first
    if sampler == "lms" and sampling:
        import importlib.util

        _require(importlib.util.find_spec("scipy") is not None, source,
                 f"sample_sampler {config.sample_sampler} needs scipy (diffusers' LMS sampler uses it): pip install "
                 "scipy, or choose another sampler such as euler_a")


# The keyword arguments sd-scripts' get_scheduler_fix passes each schedule itself (lr_scheduler_args may not repeat
# them), and the schedules that use each of the newer schedule keys (set for another one, it is ignored there too).
LR_SCHEDULER_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "constant_with_warmup": ("num_warmup_steps",),
    "inverse_sqrt": ("num_warmup_steps", "timescale"),
    "linear": ("num_warmup_steps", "num_training_steps"),
    "cosine": ("num_warmup_steps", "num_training_steps"),
    "cosine_with_restarts": ("num_warmup_steps", "num_training_steps", "num_cycles"),
    "polynomial": ("num_warmup_steps", "num_training_steps", "power"),
    "cosine_with_min_lr": ("num_warmup_steps", "num_training_steps", "num_cycles", "min_lr_rate"),
    "warmup_stable_decay": ("num_warmup_steps", "num_stable_steps", "num_decay_steps", "num_cycles", "min_lr_ratio"),
    "piecewise_constant": (),
}
SCHEDULE_KEY_USERS = {
    "lr_decay_steps": ("warmup_stable_decay",),
    "lr_scheduler_timescale": ("inverse_sqrt",),
    "lr_scheduler_min_lr_ratio": ("cosine_with_min_lr", "warmup_stable_decay"),
}


def _validate_optimizer_and_schedule(config: TrainConfig, source: str) -> None:
    """What sd-scripts' get_optimizer and get_scheduler_fix would stop on, caught before a model loads; schedule
    keys that the chosen schedule does not use get a warning (sd-scripts ignores them)."""
    _old_optimizer_flags(config, source)
    for key in ("lr_warmup_steps", "lr_decay_steps"):
        value = getattr(config, key)
        _require(value >= 0, source, f"{key} must be >= 0 (got {value})")
        _require(not isinstance(value, float) or value < 1, source,
                 f"{key} must be whole steps (an integer such as 100) or a ratio below 1 of the training steps (such "
                 f"as 0.1), got {shown(value)}: sd-scripts multiplies any float by the training steps")
    _require(config.lr_scheduler_num_cycles >= 0, source,
             f"lr_scheduler_num_cycles must be >= 0 (got {config.lr_scheduler_num_cycles})")
    _require(config.lr_scheduler_timescale is None or config.lr_scheduler_timescale >= 1, source,
             f"lr_scheduler_timescale must be at least 1 (got {config.lr_scheduler_timescale})")
    ratio = config.lr_scheduler_min_lr_ratio
    _require(ratio is None or 0 <= ratio <= 1, source, f"lr_scheduler_min_lr_ratio must be between 0 and 1 (got "
             f"{ratio}): the lowest learning rate as a share of the initial one")
    name = config.lr_scheduler
    if name in REFUSED_LR_SCHEDULERS:
        raise ConfigError(f"{source}: lr_scheduler {name} is not supported: {REFUSED_LR_SCHEDULERS[name]}")
    _one_of(config, "lr_scheduler", LR_SCHEDULERS, source)
    scheduler_args = scheduler_args_dict(config.lr_scheduler_args, source)
    _validate_lr_scheduler_type(config, source)
    relative_step = config.optimizer_type.lower() == "adafactor" and _adafactor_relative_step(config.optimizer_args)
    _require(name != "adafactor" or relative_step, source, 'lr_scheduler "adafactor" only works with optimizer_type '
             '= "AdaFactor" and its relative_step (the default there: remove relative_step=False)')
    if config.optimizer_type.lower().endswith("schedulefree"):
        if name != "constant" or config.lr_scheduler_type or config.lr_warmup_steps:
            logger.warning("%s: %s schedules itself: lr_scheduler, lr_scheduler_type and lr_warmup_steps are not "
                           "used (as in sd-scripts); give it warmup_steps in optimizer_args", source,
                           config.optimizer_type)
        return
    used = "lr_scheduler_type" if config.lr_scheduler_type else "adafactor" if relative_step else name
    _require_no_warmup(config, used, source)
    for key in LR_SCHEDULER_ARGUMENTS.get(used, ()):
        _require(key not in scheduler_args, source, f"lr_scheduler_args {key}: lr_scheduler {used} gets it from "
                 "its own key (lr_warmup_steps, lr_decay_steps, lr_scheduler_num_cycles, lr_scheduler_power, "
                 "lr_scheduler_timescale or lr_scheduler_min_lr_ratio); sd-scripts stops on the repeat")
    if used == "piecewise_constant":
        _require(_valid_step_rules(scheduler_args.get("step_rules")), source, 'lr_scheduler "piecewise_constant" '
                 "needs lr_scheduler_args = [\"step_rules='1:10,0.1:20,0.01'\"] (factor 1 before step 10, 0.1 "
                 "before step 20, then 0.01)")
    if used == "cosine_with_min_lr":
        _require((ratio is None) != ("min_lr" not in scheduler_args), source, 'lr_scheduler "cosine_with_min_lr" '
                 "needs one of lr_scheduler_min_lr_ratio (such as 0.1) or min_lr in lr_scheduler_args, not both")
    unused = [key for key, users in SCHEDULE_KEY_USERS.items() if getattr(config, key) and used not in users]
    if used in ("piecewise_constant", "adafactor") and config.lr_warmup_steps:
        unused.append("lr_warmup_steps")
    if used == "adafactor" and scheduler_args:
        unused.append("lr_scheduler_args")
    if unused:
        logger.warning("%s: not used by %s (as in sd-scripts): %s", source,
                       config.lr_scheduler_type or f"lr_scheduler {used}", ", ".join(unused))


def _old_optimizer_flags(config: TrainConfig, source: str) -> None:
    """sd-scripts' flags from before optimizer_type: use_8bit_adam means "AdamW8bit", use_lion_optimizer "Lion";
    with optimizer_type set too (or both flags), sd-scripts stops. The flag becomes optimizer_type here, so that the
    config we write says it once."""
    flags = [key for key in ("use_8bit_adam", "use_lion_optimizer") if getattr(config, key)]
    if not flags:
        return
    _require(len(flags) == 1, source, "use_8bit_adam and use_lion_optimizer are both set; set optimizer_type "
             "instead (AdamW8bit or Lion)")
    meaning = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}[flags[0]]
    _require(not config.optimizer_type, source, f"{flags[0]} and optimizer_type {shown(config.optimizer_type)} are "
             f'both set; remove {flags[0]} (it means optimizer_type = "{meaning}")')
    config.optimizer_type = meaning
    setattr(config, flags[0], False)


def _validate_lr_scheduler_type(config: TrainConfig, source: str) -> None:
    """A class name only (it is imported when training starts); ReduceLROnPlateau steps on a metric."""
    value = config.lr_scheduler_type
    if not value:
        return
    _require(all(part.isidentifier() for part in value.split(".")), source, "lr_scheduler_type must be a class "
             f"name such as CosineAnnealingLR (torch.optim.lr_scheduler) or module.Class, got {shown(value)}")
    _require(value.rpartition(".")[2] != "ReduceLROnPlateau", source, "lr_scheduler_type ReduceLROnPlateau steps "
             "on a validation loss, which is not computed (sd-scripts stops at its first step); pick another")


def _require_no_warmup(config: TrainConfig, used: str, source: str) -> None:
    """sd-scripts stops when constant, adafactor or a lr_scheduler_type get warmup steps (a ratio is checked once
    the training steps are known: one that rounds to 0 steps passes, as there)."""
    warmup = config.lr_warmup_steps
    if isinstance(warmup, float) or warmup == 0:
        return
    fixes = {
        "constant": 'lr_scheduler "constant" takes no lr_warmup_steps (sd-scripts stops on it); use lr_scheduler '
                    '"constant_with_warmup" or set lr_warmup_steps = 0',
        "adafactor": "lr_warmup_steps: AdaFactor's relative_step brings its own schedule, which takes no warmup "
                     "(sd-scripts stops on it); set lr_warmup_steps = 0, or relative_step=False in optimizer_args",
        "lr_scheduler_type": f"lr_scheduler_type {shown(config.lr_scheduler_type)} takes no lr_warmup_steps "
                             "(sd-scripts stops on it); set lr_warmup_steps = 0",
    }
    _require(used not in fixes, source, fixes.get(used, ""))


def _adafactor_relative_step(optimizer_args: list[str]) -> bool:
    """AdaFactor's relative_step as sd-scripts decides it: on unless relative_step=False, back on with
    warmup_init=True."""
    flags = {}
    for item in optimizer_args:
        key, _, value = item.partition("=")
        if key.strip() in ("relative_step", "warmup_init"):
            flags[key.strip()] = value.strip().lower() not in ("false", "0", "0.0", "none", "")
    return flags.get("relative_step", True) or flags.get("warmup_init", False)


def _valid_step_rules(rules: Any) -> bool:
    """diffusers' piecewise_constant rules: ``factor:step`` pairs, then the last factor."""
    if not isinstance(rules, str):
        return False
    *pairs, last = rules.split(",")
    try:
        for pair in pairs:
            factor, step = pair.split(":")
            float(factor), int(step)
        float(last)
    except ValueError:
        return False
    return True


def _validate_noise_and_loss(config: TrainConfig, source: str) -> None:
    """sd-scripts' choices and refusals for the noise and loss options (``verify_training_args``), and the values
    that cannot work: timesteps outside the 1000-step schedule, an exponential huber schedule's log(huber_c)."""
    _one_of(config, "loss_type", ("l1", "l2", "huber", "smooth_l1"), source)
    _one_of(config, "huber_schedule", ("constant", "exponential", "snr"), source)
    if config.loss_type in ("huber", "smooth_l1"):
        for key in ("huber_c", "huber_scale"):
            _require(getattr(config, key) > 0, source, f"{key} must be > 0 (got {getattr(config, key)}); "
                     f"sd-scripts' default is {getattr(TrainConfig, key)}")
    for key in ("ip_noise_gamma", "v_pred_like_loss", "multires_noise_iterations"):
        value = getattr(config, key)
        _require(value is None or value >= 0, source, f"{key} must be >= 0 (got {value})")
    low, high = config.min_timestep, config.max_timestep
    _require(low is None or 0 <= low <= 999, source, f"min_timestep must be between 0 and 999 (got {low})")
    _require(high is None or 1 <= high <= 1000, source, f"max_timestep must be between 1 and 1000 (got {high})")
    _require((low or 0) <= (1000 if high is None else high), source,
             f"min_timestep ({low}) must be <= max_timestep ({high if high is not None else 1000})")
    _require(config.adaptive_noise_scale is None or config.noise_offset is not None, source,
             "adaptive_noise_scale requires noise_offset; set noise_offset (0.1 is usual) or remove it")
    _require(not config.scale_v_pred_loss_like_noise_pred or config.v_parameterization, source,
             "scale_v_pred_loss_like_noise_pred can be enabled only with v_parameterization")
    _require(not (config.v_pred_like_loss and config.v_parameterization), source,
             "v_pred_like_loss cannot be enabled with v_parameterization")
    if config.zero_terminal_snr and not config.v_parameterization:
        logger.warning("%s: zero_terminal_snr is enabled but v_parameterization is not; training will be "
                       "unexpected (sd-scripts warns the same)", source)
    for flag, base in (("noise_offset_random_strength", "noise_offset"),
                       ("ip_noise_gamma_random_strength", "ip_noise_gamma")):
        if getattr(config, flag) and not getattr(config, base):
            logger.warning("%s: %s has no effect without %s", source, flag, base)


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
    from lycolab.networks.args import NetworkArgsError, network_kwargs, unknown_network_args
    from lycolab.networks.registry import algorithm_names

    algo = network_args.get("algo", "lora")
    _require(algo.strip().lower() in algorithm_names(), source,
             f"network_args algo must be one of {', '.join(algorithm_names())} (got {shown(algo)})")

    try:
        network_kwargs(config.network_module, config.network_dim, config.network_alpha, network_args,
                       config.network_dropout)
    except NetworkArgsError as error:
        raise ConfigError(f"{source}: {_first_line(error)[:300]}") from None
    unknown = unknown_network_args(config.network_module, network_args)
    refused = [key for key in unknown if key in REFUSED_NETWORK_ARGS]
    _require(not refused, source, f"network_args {', '.join(refused)}: not supported by lycolab yet (sd-scripts "
             "reads them only in its SD3/Lumina/Anima networks, not networks.lora); use block_dims / *_lr_weight "
             "(networks.lora) or a preset with exclude_name (lycoris.kohya)")
    if unknown:
        logger.warning("%s: network_args not used by %s: %s", source, config.network_module,
                       ", ".join(map(plain, unknown)))


# sd-scripts network arguments that lycolab does not implement: refused by name, not ignored
REFUSED_NETWORK_ARGS = ("train_block_indices", "exclude_patterns", "include_patterns")


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
    _require(subset.caption_separator != "", source, "caption_separator must not be empty; the default is \",\"")
    _require(not subset.color_aug, source,
             "color_aug is not supported (it only shifts hue a little and rules out latent caching); remove it")
    _require(not subset.face_crop_aug_range, source,
             "face_crop_aug_range is not supported (it needs face positions in the file names); remove it")
