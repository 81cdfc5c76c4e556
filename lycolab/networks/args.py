"""sd-scripts' ``network_module`` / ``network_args`` strings → :func:`create_network` keyword arguments.

Both ``networks.lora`` (sd-scripts) and ``lycoris.kohya`` (LyCORIS) take their options as ``"key=value"`` strings.
Which keys an algorithm takes, and their types, come from its options dataclass in the registry
(``lycolab.networks.registry``); LyCORIS' old spellings (``use_conv_cp``/``use_cp``/``disable_conv_cp`` for
``use_tucker``, ``constrain``) are read too. Booleans are parsed properly: LyCORIS treats ``decompose_both=False`` as
true because it is a non-empty string.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from lycolab.networks.block_weights import KEYS as BLOCK_WISE_ARGS
from lycolab.networks.block_weights import BlockWiseError, check_counts, parse_block_wise
from lycolab.networks.presets import Preset, PresetError, get_preset, with_options
from lycolab.networks.registry import Algorithm, UnknownAlgorithm, get_algorithm, option_types

logger = logging.getLogger(__name__)

# Keys that shape the network rather than each module
NETWORK_ARGS = ("algo", "conv_dim", "conv_alpha", "preset", "train_norm")
# LoRA+ (both network modules): the lora_up weights' lr is the group's lr times the ratio
LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
# LyCORIS' deprecated spellings → the option they set (disable_conv_cp is the inverse of use_tucker)
TUCKER_SPELLINGS = ("use_conv_cp", "use_cp", "disable_conv_cp")
SPELLINGS = {**dict.fromkeys(TUCKER_SPELLINGS, "use_tucker"), "constrain": "constraint"}
KOHYA_OPTIONS = ("dropout", "rank_dropout", "module_dropout")
SIGNED_OPTIONS = ("factor",)  # -1 means "balanced"
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class NetworkArgsError(ValueError):
    """A ``network_args`` value that cannot be used; the message names the key."""


def chosen_algorithm(network_module: str, args: dict[str, str]) -> Algorithm:
    """The algorithm ``network_args`` ask for (``networks.lora`` always makes LoRA/LoCon, as in sd-scripts)."""
    if network_module != "lycoris.kohya":
        return get_algorithm("lora")
    try:
        return get_algorithm(args.get("algo", "lora"))
    except UnknownAlgorithm as error:
        raise NetworkArgsError(f"network_args {error}") from None


def known_network_args(network_module: str, algorithm: Algorithm) -> set[str]:
    """Every key this network module and algorithm act on."""
    if network_module != "lycoris.kohya":
        return {"conv_dim", "conv_alpha", *KOHYA_OPTIONS, *BLOCK_WISE_ARGS, *LORAPLUS_ARGS}
    options = set(option_types(algorithm.options_class))
    spellings = {old for old, new in SPELLINGS.items() if new in options}
    return {*NETWORK_ARGS, *options, *spellings, *LORAPLUS_ARGS}


def unknown_network_args(network_module: str, args: dict[str, str]) -> list[str]:
    """Keys this version does not act on for this algorithm (reported once as a warning by the caller)."""
    try:
        algorithm = chosen_algorithm(network_module, args)
    except NetworkArgsError:
        return []
    known = known_network_args(network_module, algorithm)
    return sorted(key for key in args if key not in known)


def network_kwargs(network_module: str, dim: int | None, alpha: float | None, args: dict[str, str],
                   network_dropout: float | None = None) -> dict[str, Any]:
    """Keyword arguments for :func:`lycolab.networks.create_network`; raises :class:`NetworkArgsError`."""
    algorithm = chosen_algorithm(network_module, args)
    is_lycoris = network_module == "lycoris.kohya"
    algo = args.get("algo", "lora").strip().lower() if is_lycoris else "lora"
    kwargs: dict[str, Any] = {"algo": algo, "dim": dim or 4, "alpha": alpha, "network_module": network_module}
    if "conv_dim" in args:
        kwargs["conv_dim"] = _number(args, "conv_dim", int)
    if "conv_alpha" in args:
        kwargs["conv_alpha"] = _number(args, "conv_alpha", float)
    types = option_types(algorithm.options_class)
    names = [name for name in types if not is_lycoris and name in KOHYA_OPTIONS or is_lycoris]
    for name in names:
        if name in args:
            kwargs[name] = _typed(args, name, types[name])
    if is_lycoris:
        kwargs.update(_spelled_options(args, types))
        if "preset" in args:
            try:
                kwargs["preset"] = checked_preset(get_preset(args["preset"]), algorithm)
            except PresetError as error:
                raise NetworkArgsError(str(error)) from None
        if "train_norm" in args:
            kwargs["train_norm"] = _boolean(args, "train_norm")
    else:
        try:
            block_wise = parse_block_wise(args)
            if block_wise is not None:
                check_counts(block_wise)
        except BlockWiseError as error:
            raise NetworkArgsError(str(error)) from None
        if block_wise is not None:
            kwargs["block_wise"] = block_wise
    if any(key in args for key in LORAPLUS_ARGS):
        from lycolab.networks.network import LoraPlus

        ratios = [_number(args, key, float) if key in args else None for key in LORAPLUS_ARGS]
        kwargs["loraplus"] = LoraPlus(*ratios)
    if network_dropout is not None and "dropout" not in kwargs:
        kwargs["dropout"] = float(network_dropout)
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if not 0.0 <= kwargs.get(key, 0.0) < 1.0:
            raise NetworkArgsError(f"network_args {key} must be in [0, 1) (got {kwargs[key]})")
    return kwargs


def checked_preset(preset: Preset, algorithm: Algorithm) -> Preset:
    """``preset`` with its overrides' options typed for the algorithm each names (the network's when none): an
    unknown algo or a bad value is a :class:`NetworkArgsError` naming the entry; options the algorithm does not
    take are dropped with a warning (LyCORIS' modules ignore them)."""
    def check(where: str, algo: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
        try:
            chosen = get_algorithm(algo) if algo else algorithm
        except UnknownAlgorithm as error:
            raise NetworkArgsError(f"{where}.algo: {error}") from None
        types = option_types(chosen.options_class)
        texts = {key: str(value) for key, value in options.items()}
        try:
            typed = {key: _typed(texts, key, types[key]) for key in texts if key in types}
            typed.update(_spelled_options(texts, types))
        except NetworkArgsError as error:
            raise NetworkArgsError(f"{where}: {str(error).removeprefix('network_args ')}") from None
        unknown = sorted(key for key in texts if key not in types and SPELLINGS.get(key) not in types)
        if unknown:
            logger.warning("%s: %s not used by %s; ignored", where, ", ".join(unknown), chosen.name)
        return typed

    return with_options(preset, check)


def _spelled_options(args: dict[str, str], types: dict[str, type]) -> dict[str, Any]:
    """Options given under LyCORIS' old names: any true tucker spelling (or ``disable_conv_cp=false``) turns tucker
    on, as there; ``constrain`` is ``constraint``."""
    options: dict[str, Any] = {}
    if "use_tucker" in types:
        spelled = [key for key in ("use_tucker", "use_conv_cp", "use_cp") if key in args]
        if any(_boolean(args, key) for key in spelled) or ("disable_conv_cp" in args
                                                           and not _boolean(args, "disable_conv_cp")):
            options["use_tucker"] = True
    if "constrain" in args and "constraint" in types and "constraint" not in args:
        options["constraint"] = _typed(args, "constrain", types["constraint"])
    return options


def _typed(args: dict[str, str], key: str, kind: type) -> Any:
    if kind is bool:
        return _boolean(args, key)
    if kind in (int, float):
        return _number(args, key, kind)
    return args[key].strip()


def _number(args: dict[str, str], key: str, kind: type) -> Any:
    text = args[key].strip()
    try:
        value = kind(float(text)) if kind is int else kind(text)
    except ValueError:
        raise NetworkArgsError(f"network_args {key} must be a number (got {text!r})") from None
    except OverflowError:  # int(float("inf"))
        value = math.inf
    if not math.isfinite(value):
        raise NetworkArgsError(f"network_args {key} must be a finite number (got {text!r})")
    if key not in SIGNED_OPTIONS and value < 0:
        raise NetworkArgsError(f"network_args {key} must be >= 0 (got {text!r})")
    return value


def _boolean(args: dict[str, str], key: str) -> bool:
    text = args[key].strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise NetworkArgsError(f"network_args {key} must be true or false (got {args[key]!r})")
