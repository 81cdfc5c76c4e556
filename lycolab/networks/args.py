"""sd-scripts' ``network_module`` / ``network_args`` strings → :func:`create_network` keyword arguments.

Both ``networks.lora`` (sd-scripts) and ``lycoris.kohya`` (LyCORIS) take their options as ``"key=value"`` strings;
this reads them the way those modules do (LyCORIS' ``use_conv_cp``/``use_cp`` spellings of ``use_tucker``
included), but parses booleans properly: LyCORIS treats ``decompose_both=False`` as true because it is a non-empty
string.
"""

from __future__ import annotations

import math
from typing import Any

BOOLEAN_OPTIONS = ("use_tucker", "decompose_both", "full_matrix", "unbalanced_factorization", "rank_dropout_scale")
TUCKER_SPELLINGS = ("use_tucker", "use_conv_cp", "use_cp")
FLOAT_OPTIONS = ("conv_alpha", "dropout", "rank_dropout", "module_dropout")
LYCORIS_ONLY = ("algo", "factor", "use_conv_cp", "use_cp", "disable_conv_cp", "preset", *BOOLEAN_OPTIONS)
KNOWN_ARGS = frozenset(("conv_dim", *FLOAT_OPTIONS, *LYCORIS_ONLY))
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class NetworkArgsError(ValueError):
    """A ``network_args`` value that cannot be used; the message names the key."""


def unknown_network_args(network_module: str, args: dict[str, str]) -> list[str]:
    """Keys this version does not act on (reported once as a warning by the caller)."""
    known = KNOWN_ARGS if network_module == "lycoris.kohya" else KNOWN_ARGS - set(LYCORIS_ONLY)
    return sorted(key for key in args if key not in known)


def network_kwargs(network_module: str, dim: int | None, alpha: float | None, args: dict[str, str],
                   network_dropout: float | None = None) -> dict[str, Any]:
    """Keyword arguments for :func:`lycolab.networks.create_network`; raises :class:`NetworkArgsError`."""
    is_lycoris = network_module == "lycoris.kohya"
    algo = args.get("algo", "lora").strip().lower() if is_lycoris else "lora"
    kwargs: dict[str, Any] = {"algo": algo, "dim": dim or 4, "alpha": alpha, "network_module": network_module}
    if "conv_dim" in args:
        kwargs["conv_dim"] = _number(args, "conv_dim", int)
    for key in FLOAT_OPTIONS:
        if key in args:
            kwargs[key] = _number(args, key, float)
    if network_dropout is not None and "dropout" not in kwargs:
        kwargs["dropout"] = float(network_dropout)
    for key in ("dropout", "rank_dropout", "module_dropout"):
        if not 0.0 <= kwargs.get(key, 0.0) < 1.0:
            raise NetworkArgsError(f"network_args {key} must be in [0, 1) (got {kwargs[key]})")
    if is_lycoris:
        kwargs.update(_lycoris_options(args))
    return kwargs


def _lycoris_options(args: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.get("preset", "full") != "full":
        raise NetworkArgsError(f"network_args preset {args['preset']!r} is not supported; only the default "
                               "'full' preset (every layer LyCORIS adapts) is")
    if "factor" in args:
        options["factor"] = _number(args, "factor", int)
    for key in BOOLEAN_OPTIONS:
        if key in args:
            options[key] = _boolean(args, key)
    if any(_boolean(args, key) for key in TUCKER_SPELLINGS if key in args):
        options["use_tucker"] = True
    return options


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
    if key != "factor" and value < 0:
        raise NetworkArgsError(f"network_args {key} must be >= 0 (got {text!r})")
    return value


def _boolean(args: dict[str, str], key: str) -> bool:
    text = args[key].strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise NetworkArgsError(f"network_args {key} must be true or false (got {args[key]!r})")
