"""Optimizers by sd-scripts' ``optimizer_type`` name, built from the package each one comes from.

Names are matched case-insensitively, as sd-scripts does. ``module.ClassName`` (e.g. ``torch.optim.RAdam``) builds any
other optimizer. The bitsandbytes 8-bit optimizers need a CUDA GPU: elsewhere they fall back to the 32-bit optimizer
of the same family with a warning, and the optimizer actually used is what the metadata records.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lycolab.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerChoice:
    """The optimizer that was built and the learning-rate schedule it forces (AdaFactor's relative step)."""

    optimizer: torch.optim.Optimizer
    name: str
    forced_scheduler: str | None = None


def parse_optimizer_args(items: list[str]) -> dict[str, object]:
    """``["weight_decay=0.1", "betas=0.9,0.99"]`` → keyword arguments with numbers, tuples and booleans parsed."""
    parsed: dict[str, object] = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator:
            raise ConfigError(f'optimizer_args item {item!r} must look like "key=value"')
        parsed[key.strip()] = _literal(value.strip())
    return parsed


def _literal(text: str) -> object:
    """sd-scripts reads each value with ``ast.literal_eval`` (``0.9,0.99`` and ``[0.9,0.99]`` are sequences,
    ``True`` a boolean); what that refuses (``true``, a bare word) is read leniently instead."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if "," in text:
        return tuple(_literal(part.strip()) for part in text.split(",") if part.strip())
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"this optimizer needs the {package} package: pip install {package}") from None


def _bitsandbytes(name: str, fallback: str):
    """bitsandbytes, or None with a warning naming the 32-bit optimizer used instead."""
    if not torch.cuda.is_available():
        logger.warning("optimizer_type %s needs a CUDA GPU (bitsandbytes); using %s (32-bit) on this machine",
                       name, fallback)
        return None
    try:
        import bitsandbytes
    except ImportError:
        logger.warning("optimizer_type %s needs bitsandbytes (pip install bitsandbytes); using %s (32-bit)",
                       name, fallback)
        return None
    return bitsandbytes


def _adamw(groups, lr, kwargs):
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


def _sgd_nesterov(groups, lr, kwargs):
    kwargs.setdefault("momentum", 0.9)
    return torch.optim.SGD(groups, lr=lr, nesterov=True, **kwargs)


def _lion(groups, lr, kwargs):
    return _import("lion_pytorch", "lion-pytorch").Lion(groups, lr=lr, **kwargs)


def _eight_bit(class_name: str, fallback: Callable, fallback_name: str, extra: dict | None = None) -> Callable:
    def build(groups, lr, kwargs, name):
        bnb = _bitsandbytes(name, fallback_name)
        if bnb is None:
            return fallback(groups, lr, kwargs), fallback_name
        return getattr(bnb.optim, class_name)(groups, lr=lr, **(extra or {}), **kwargs), name
    return build


def _dadaptation(class_name: str) -> Callable:
    def build(groups, lr, kwargs):
        groups = _one_learning_rate(class_name, groups, lr)
        return getattr(_import("dadaptation", "dadaptation"), class_name)(groups, lr=lr, **kwargs)
    return build


def _prodigy(groups, lr, kwargs):
    groups = _one_learning_rate("Prodigy", groups, lr)
    return _import("prodigyopt", "prodigyopt").Prodigy(groups, lr=lr, **kwargs)


def _one_learning_rate(name: str, groups: list[dict], lr: float) -> list[dict]:
    """D-Adaptation and Prodigy find the step size themselves: they take one lr (around 1.0) for every group, or 0
    to freeze a group. A different text-encoder lr is replaced by the first group's, with a warning."""
    first = groups[0].get("lr", lr) if groups else lr
    if first <= 0.1:
        logger.warning("%s finds the step size itself and expects learning_rate around 1.0 (got %g); "
                       "set unet_lr/text_encoder_lr/learning_rate to 1.0", name, first)
    if all(group.get("lr", lr) in (first, 0.0) for group in groups):
        return groups
    logger.warning("%s uses one learning rate for all parameter groups: using %g for every group "
                   "(set text_encoder_lr equal to unet_lr, or 0 to freeze it)", name, first)
    return [{**group, "lr": first} for group in groups]


# sd-scripts' names (lower-cased) → builder(groups, lr, kwargs).
PLAIN_OPTIMIZERS: dict[str, tuple[str, Callable]] = {
    "adamw": ("AdamW", _adamw),
    "sgdnesterov": ("SGDNesterov", _sgd_nesterov),
    "lion": ("Lion", _lion),
    "dadaptation": ("DAdaptation", _dadaptation("DAdaptAdam")),
    "dadaptadam": ("DAdaptAdam", _dadaptation("DAdaptAdam")),
    "dadaptadagrad": ("DAdaptAdaGrad", _dadaptation("DAdaptAdaGrad")),
    "dadaptadan": ("DAdaptAdan", _dadaptation("DAdaptAdan")),
    "dadaptlion": ("DAdaptLion", _dadaptation("DAdaptLion")),
    "dadaptsgd": ("DAdaptSGD", _dadaptation("DAdaptSGD")),
    "prodigy": ("Prodigy", _prodigy),
}
EIGHT_BIT_OPTIMIZERS: dict[str, tuple[str, Callable]] = {
    "adamw8bit": ("AdamW8bit", _eight_bit("AdamW8bit", _adamw, "AdamW")),
    "pagedadamw8bit": ("PagedAdamW8bit", _eight_bit("PagedAdamW8bit", _adamw, "AdamW")),
    "lion8bit": ("Lion8bit", _eight_bit("Lion8bit", _lion, "Lion")),
    "pagedlion8bit": ("PagedLion8bit", _eight_bit("PagedLion8bit", _lion, "Lion")),
    "sgdnesterov8bit": ("SGDNesterov8bit", _eight_bit("SGD8bit", _sgd_nesterov, "SGDNesterov",
                                                       {"momentum": 0.9, "nesterov": True})),
}
OPTIMIZER_NAMES = tuple(name for name, _ in (*PLAIN_OPTIMIZERS.values(), *EIGHT_BIT_OPTIMIZERS.values())) + (
    "AdaFactor",)


def build_optimizer(optimizer_type: str, parameter_groups: list[dict], learning_rate: float, optimizer_args: list[str]
                    ) -> OptimizerChoice:
    """The optimizer sd-scripts would build for this name, with ``optimizer_args`` as keyword arguments."""
    name = optimizer_type or "AdamW"
    kwargs = parse_optimizer_args(optimizer_args)
    lowered = name.lower()
    try:
        if lowered in PLAIN_OPTIMIZERS:
            canonical, build = PLAIN_OPTIMIZERS[lowered]
            return OptimizerChoice(build(parameter_groups, learning_rate, kwargs), canonical)
        if lowered in EIGHT_BIT_OPTIMIZERS:
            canonical, build = EIGHT_BIT_OPTIMIZERS[lowered]
            optimizer, used = build(parameter_groups, learning_rate, kwargs, canonical)
            return OptimizerChoice(optimizer, used)
        if lowered == "adafactor":
            return _adafactor(parameter_groups, learning_rate, kwargs)
        if "." in name:
            return OptimizerChoice(_dotted(name)(parameter_groups, lr=learning_rate, **kwargs), name)
    except TypeError as error:  # an optimizer_args key the optimizer does not take
        raise ConfigError(f"optimizer_args do not fit {name}: {error}") from None
    raise ConfigError(f"optimizer_type {name!r} is not known; use one of {', '.join(OPTIMIZER_NAMES)} "
                      "or a full class name such as torch.optim.RAdam")


def _adafactor(groups: list[dict], lr: float, kwargs: dict) -> OptimizerChoice:
    """transformers' Adafactor with sd-scripts' defaults: relative step on, which brings its own schedule."""
    from transformers.optimization import Adafactor

    for key, value in (("relative_step", True), ("scale_parameter", True), ("warmup_init", False)):
        kwargs.setdefault(key, value)
    if not kwargs["relative_step"]:
        return OptimizerChoice(Adafactor(groups, lr=lr, **kwargs), "AdaFactor")
    logger.info("AdaFactor with relative_step finds its own learning rate; learning_rate %g is its initial lr, "
                "and the lr_scheduler is adafactor", lr)
    groups = [{key: value for key, value in group.items() if key != "lr"} for group in groups]
    return OptimizerChoice(Adafactor(groups, lr=None, **kwargs), "AdaFactor", forced_scheduler="adafactor")


def _dotted(name: str):
    module_name, _, class_name = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ConfigError(f"optimizer_type {name!r}: no class {class_name} in module {module_name}") from None
