"""Optimizers by sd-scripts' ``optimizer_type`` name, built as its ``get_optimizer`` (library/train_util.py) does.

Names are matched case-insensitively, as sd-scripts does; any other name is a class: ``module.ClassName`` (e.g.
``bitsandbytes.optim.AdEMAMix8bit``) or, without a dot, a ``torch.optim`` class (``RAdam``, case as written). The
bitsandbytes optimizers need a CUDA GPU: elsewhere they fall back to the 32-bit optimizer of the same family with a
warning, and the optimizer actually used is what the metadata records.
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
    """The optimizer that was built, what the metadata records, and what it asks of the loop.

    ``forced_scheduler`` is AdaFactor's own schedule (relative step); ``schedule_free`` optimizers schedule themselves
    (the loop gets a schedule that does nothing) and need ``train()`` before stepping and ``eval()`` before their
    weights are saved or sampled from, as sd-scripts' train_network.py calls them.
    """

    optimizer: torch.optim.Optimizer
    name: str
    forced_scheduler: str | None = None
    ss_optimizer: str = ""
    schedule_free: bool = False


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


def is_schedule_free(optimizer_type: str) -> bool:
    """sd-scripts' ``is_schedulefree_optimizer``: decided by the name (dotted ones too), not by the class."""
    return optimizer_type.lower().endswith("schedulefree")


def _import(module: str, package: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"optimizer_type {name} needs the {package} package: pip install {package}") from None


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


# Each builder takes (parameter groups, lr, kwargs, name) and may add sd-scripts' defaults to kwargs, which the
# metadata then records as sd-scripts does (SGDNesterov's momentum=0.9).
def _adamw(groups, lr, kwargs, name):
    """torch's AdamW; its fused kernel unless ``optimizer_args`` choose an implementation: one pass over all
    parameters instead of a dozen ops per tensor (for a LoRA's ~450 tensors on a 2-core CPU: 11 ms a step against
    35 ms for sd-scripts' default loop). Not in ``kwargs``, so ``ss_optimizer`` stays what sd-scripts writes."""
    if not {"fused", "foreach", "differentiable", "capturable"} & set(kwargs):
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True, **kwargs)
        except RuntimeError:  # a device without the fused kernel
            pass
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


def _sgd_nesterov(groups, lr, kwargs, name):
    kwargs.setdefault("momentum", 0.9)  # torch's Nesterov needs momentum
    return torch.optim.SGD(groups, lr=lr, nesterov=True, **kwargs)


def _lion(groups, lr, kwargs, name):
    return _import("lion_pytorch", "lion-pytorch", name).Lion(groups, lr=lr, **kwargs)


def _bnb(class_name: str, fallback: Callable, fallback_name: str, momentum: bool = False) -> Callable:
    """A bitsandbytes optimizer on CUDA, else ``fallback`` (its 32-bit family). SGDNesterov8bit is bitsandbytes'
    SGD8bit with momentum 0.9 unless given; bitsandbytes takes ``nesterov`` but ignores it, so it is plain momentum
    SGD on the GPU, as in sd-scripts (which builds it a second time without ``nesterov=True``)."""
    def build(groups, lr, kwargs, name):
        if momentum:
            kwargs.setdefault("momentum", 0.9)
        bnb = _bitsandbytes(name, fallback_name)
        if bnb is None:
            return fallback(groups, lr, kwargs, fallback_name), fallback_name
        return getattr(bnb.optim, class_name)(groups, lr=lr, **kwargs), name
    return build


def _dadaptation(module: str, class_name: str) -> Callable:
    def build(groups, lr, kwargs, name):
        groups = _one_learning_rate(name, groups, lr)
        return getattr(_import(module, "dadaptation", name), class_name)(groups, lr=lr, **kwargs)
    return build


def _prodigy(groups, lr, kwargs, name):
    groups = _one_learning_rate("Prodigy", groups, lr)
    return _import("prodigyopt", "prodigyopt", name).Prodigy(groups, lr=lr, **kwargs)


def _schedule_free(class_name: str) -> Callable:
    def build(groups, lr, kwargs, name):
        return getattr(_import("schedulefree", "schedulefree", name), class_name)(groups, lr=lr, **kwargs)
    return build


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


# sd-scripts' names (lower-cased) → (its spelling, builder). DAdaptation is DAdaptAdamPreprint there.
PLAIN_OPTIMIZERS: dict[str, tuple[str, Callable]] = {
    "adamw": ("AdamW", _adamw),
    "sgdnesterov": ("SGDNesterov", _sgd_nesterov),
    "lion": ("Lion", _lion),
    "dadaptation": ("DAdaptation", _dadaptation("dadaptation.experimental", "DAdaptAdamPreprint")),
    "dadaptadampreprint": ("DAdaptAdamPreprint", _dadaptation("dadaptation.experimental", "DAdaptAdamPreprint")),
    "dadaptadam": ("DAdaptAdam", _dadaptation("dadaptation", "DAdaptAdam")),
    "dadaptadagrad": ("DAdaptAdaGrad", _dadaptation("dadaptation", "DAdaptAdaGrad")),
    "dadaptadan": ("DAdaptAdan", _dadaptation("dadaptation", "DAdaptAdan")),
    "dadaptadanip": ("DAdaptAdanIP", _dadaptation("dadaptation.experimental", "DAdaptAdanIP")),
    "dadaptlion": ("DAdaptLion", _dadaptation("dadaptation", "DAdaptLion")),
    "dadaptsgd": ("DAdaptSGD", _dadaptation("dadaptation", "DAdaptSGD")),
    "prodigy": ("Prodigy", _prodigy),
    "radamschedulefree": ("RAdamScheduleFree", _schedule_free("RAdamScheduleFree")),
    "adamwschedulefree": ("AdamWScheduleFree", _schedule_free("AdamWScheduleFree")),
    "sgdschedulefree": ("SGDScheduleFree", _schedule_free("SGDScheduleFree")),
}
BITSANDBYTES_OPTIMIZERS: dict[str, tuple[str, Callable]] = {
    "adamw8bit": ("AdamW8bit", _bnb("AdamW8bit", _adamw, "AdamW")),
    "pagedadamw": ("PagedAdamW", _bnb("PagedAdamW", _adamw, "AdamW")),
    "pagedadamw8bit": ("PagedAdamW8bit", _bnb("PagedAdamW8bit", _adamw, "AdamW")),
    "pagedadamw32bit": ("PagedAdamW32bit", _bnb("PagedAdamW32bit", _adamw, "AdamW")),
    "lion8bit": ("Lion8bit", _bnb("Lion8bit", _lion, "Lion")),
    "pagedlion8bit": ("PagedLion8bit", _bnb("PagedLion8bit", _lion, "Lion")),
    "sgdnesterov8bit": ("SGDNesterov8bit", _bnb("SGD8bit", _sgd_nesterov, "SGDNesterov", momentum=True)),
}
EIGHT_BIT_OPTIMIZERS = BITSANDBYTES_OPTIMIZERS  # the older name
OPTIMIZER_NAMES = tuple(name for name, _ in (*PLAIN_OPTIMIZERS.values(), *BITSANDBYTES_OPTIMIZERS.values())) + (
    "AdaFactor",)


def build_optimizer(optimizer_type: str, parameter_groups: list[dict], learning_rate: float, optimizer_args: list[str]
                    ) -> OptimizerChoice:
    """The optimizer sd-scripts would build for this name, with ``optimizer_args`` as keyword arguments.

    As in sd-scripts, an optimizer with a ``train()`` method (the ScheduleFree ones) is put in train mode here.
    """
    name = optimizer_type or "AdamW"
    kwargs = parse_optimizer_args(optimizer_args)
    lowered = name.lower()
    forced = None
    try:
        if lowered in PLAIN_OPTIMIZERS:
            used, build = PLAIN_OPTIMIZERS[lowered]
            optimizer = build(parameter_groups, learning_rate, kwargs, used)
        elif lowered in BITSANDBYTES_OPTIMIZERS:
            canonical, build = BITSANDBYTES_OPTIMIZERS[lowered]
            optimizer, used = build(parameter_groups, learning_rate, kwargs, canonical)
        elif lowered == "adafactor":
            optimizer, used = _adafactor(parameter_groups, learning_rate, kwargs), "AdaFactor"
            forced = "adafactor" if kwargs["relative_step"] else None
        else:
            optimizer, used = _any_class(name)(parameter_groups, lr=learning_rate, **kwargs), name
    except TypeError as error:  # an optimizer_args key the optimizer does not take
        raise ConfigError(f"optimizer_args do not fit {name}: {error}") from None
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()
    return OptimizerChoice(optimizer, used, forced, _ss_optimizer(optimizer, kwargs), is_schedule_free(name))


def _ss_optimizer(optimizer: torch.optim.Optimizer, kwargs: dict[str, object]) -> str:
    """sd-scripts' ``ss_optimizer``: the class's module and name, and the keyword arguments after its defaults."""
    kind = type(optimizer)
    arguments = ",".join(f"{key}={value}" for key, value in kwargs.items())
    return f"{kind.__module__}.{kind.__name__}" + (f"({arguments})" if arguments else "")


def _adafactor(groups: list[dict], lr: float, kwargs: dict) -> torch.optim.Optimizer:
    """transformers' Adafactor as sd-scripts sets it up: relative step on unless turned off (and back on with
    warmup_init); with it, Adafactor finds its own step size, every group's lr is dropped, and the schedule is
    AdaFactor's own, reporting ``learning_rate`` until the first step."""
    from transformers.optimization import Adafactor

    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("AdaFactor: relative_step set to True because warmup_init is True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return Adafactor(groups, lr=lr, **kwargs)
    logger.info("AdaFactor with relative_step finds its own learning rate; learning_rate %g is its initial lr, "
                "and the lr_scheduler is adafactor", lr)
    if any("lr" in group for group in groups):
        logger.warning("AdaFactor with relative_step: unet_lr and text_encoder_lr are ignored")
    groups = [{key: value for key, value in group.items() if key != "lr"} for group in groups]
    return Adafactor(groups, lr=None, **kwargs)


def _any_class(name: str):
    """``module.Class``, or a ``torch.optim`` class for a name without a dot (case as written), as sd-scripts."""
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        found = getattr(torch.optim, name, None)
        if isinstance(found, type) and issubclass(found, torch.optim.Optimizer):
            return found
        hint = f" (a bitsandbytes one: bitsandbytes.optim.{name})" if name.lower().endswith("8bit") else ""
        raise ConfigError(f"optimizer_type {name!r} is not known; use one of {', '.join(OPTIMIZER_NAMES)}, a "
                          f"torch.optim class such as RAdam, or a full class name such as torch.optim.RAdam{hint}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"optimizer_type {name!r}: module {module_name} cannot be imported ({error})") from None
    except Exception as error:  # noqa: BLE001 - any module can fail to import; the key is named either way
        raise ConfigError(f"optimizer_type {name!r}: importing {module_name} failed "
                          f"({type(error).__name__}: {error})") from None
    if not hasattr(module, class_name):
        raise ConfigError(f"optimizer_type {name!r}: no class {class_name} in module {module_name}")
    return getattr(module, class_name)
