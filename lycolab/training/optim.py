"""Optimizers by sd-scripts' ``optimizer_type`` name."""

from __future__ import annotations

import logging

import torch

from lycolab.config import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_OPTIMIZERS = ("AdamW", "AdamW8bit", "SGDNesterov")


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
    if "," in text:
        return tuple(_literal(part.strip()) for part in text.split(",") if part.strip())
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def build_optimizer(optimizer_type: str, parameter_groups: list[dict], learning_rate: float, optimizer_args: list[str]
                    ) -> torch.optim.Optimizer:
    """The optimizer sd-scripts would build for this name; AdamW8bit falls back to AdamW off-GPU, saying so."""
    name = optimizer_type or "AdamW"
    kwargs = parse_optimizer_args(optimizer_args)
    lowered = name.lower()
    if lowered == "adamw8bit":
        optimizer = _adamw_8bit(parameter_groups, learning_rate, kwargs)
        if optimizer is not None:
            return optimizer
        lowered = "adamw"
    if lowered == "adamw":
        return torch.optim.AdamW(parameter_groups, lr=learning_rate, **kwargs)
    if lowered == "sgdnesterov":
        kwargs.setdefault("momentum", 0.9)
        return torch.optim.SGD(parameter_groups, lr=learning_rate, nesterov=True, **kwargs)
    raise ConfigError(
        f"optimizer_type {name!r} is not supported in this version; use one of {', '.join(SUPPORTED_OPTIMIZERS)}"
    )


def _adamw_8bit(parameter_groups: list[dict], learning_rate: float, kwargs: dict) -> torch.optim.Optimizer | None:
    if not torch.cuda.is_available():
        logger.warning("optimizer_type AdamW8bit needs a CUDA GPU (bitsandbytes); using AdamW (32-bit) on this machine")
        return None
    try:
        import bitsandbytes
    except ImportError:
        logger.warning("optimizer_type AdamW8bit needs bitsandbytes (pip install bitsandbytes); using AdamW (32-bit)")
        return None
    return bitsandbytes.optim.AdamW8bit(parameter_groups, lr=learning_rate, **kwargs)
