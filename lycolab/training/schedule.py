"""Learning-rate schedules as sd-scripts' ``get_scheduler_fix`` (library/train_util.py) builds them.

sd-scripts takes each named schedule from transformers (``TYPE_TO_SCHEDULER_FUNCTION``; piecewise_constant from
diffusers) and passes it only the arguments listed in lycolab.config's ``LR_SCHEDULER_ARGUMENTS``, plus
``lr_scheduler_args``. Warmup and decay steps may be ratios of the training steps: ``int(ratio * steps)``.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

import torch

from lycolab.config import REFUSED_LR_SCHEDULERS, ConfigError, TrainConfig, scheduler_args_dict

if TYPE_CHECKING:
    from lycolab.training.optim import OptimizerChoice

logger = logging.getLogger(__name__)


class ScheduleFreeLR:
    """sd-scripts' dummy schedule for the ScheduleFree optimizers, which schedule themselves: ``step`` does nothing
    and ``get_last_lr`` reports each group's lr. Its state is empty, so a saved state holds nothing for it."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def resolve_steps(value: int | float, total_steps: int) -> int:
    """sd-scripts' int_or_float steps: a float is a ratio of the training steps, rounded down as ``int()`` does."""
    return int(value * total_steps) if isinstance(value, float) else value


def lr_scheduler_for(config: TrainConfig, choice: OptimizerChoice, total_steps: int):
    """The schedule of this run's optimizer from the config's schedule keys (AdaFactor's own when it forces it)."""
    return build_lr_scheduler(
        choice.forced_scheduler or config.lr_scheduler, choice.optimizer, config.lr_warmup_steps, total_steps,
        config.lr_scheduler_num_cycles, config.lr_scheduler_power, config.learning_rate,
        decay_steps=config.lr_decay_steps, timescale=config.lr_scheduler_timescale,
        min_lr_ratio=config.lr_scheduler_min_lr_ratio, scheduler_type=config.lr_scheduler_type,
        scheduler_args=scheduler_args_dict(config.lr_scheduler_args), schedule_free=choice.schedule_free)


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int | float, total_steps: int,
                       num_cycles: int = 1, power: float = 1.0, initial_lr: float = 0.0, *,
                       decay_steps: int | float = 0, timescale: int | None = None, min_lr_ratio: float | None = None,
                       scheduler_type: str = "", scheduler_args: dict[str, Any] | None = None,
                       schedule_free: bool = False):
    """The schedule sd-scripts builds, checked in its order: a ScheduleFree optimizer's dummy, ``scheduler_type``
    (a class), ``adafactor`` (AdaFactor's own, reporting ``initial_lr`` until its first step), piecewise_constant,
    then transformers' schedule of that name with sd-scripts' arguments (num_cycles is halved for the min-lr and
    warmup-stable-decay cosines, whose 0.5 is one half wave)."""
    if schedule_free:
        return ScheduleFreeLR(optimizer)
    warmup = resolve_steps(warmup_steps, total_steps)
    decay = resolve_steps(decay_steps, total_steps)
    kwargs = dict(scheduler_args or {})
    if scheduler_type:
        _no_warmup(f"lr_scheduler_type {scheduler_type}", warmup, warmup_steps)
        return _custom_scheduler(scheduler_type, optimizer, kwargs)
    if name == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise ConfigError('lr_scheduler "adafactor" needs optimizer_type = "AdaFactor"')
        _no_warmup("AdaFactor's own schedule (relative_step)", warmup, warmup_steps)
        return AdafactorSchedule(optimizer, initial_lr)
    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        return _call(name, get_piecewise_constant_schedule, optimizer, kwargs)
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    try:
        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    except (ValueError, KeyError):
        raise ConfigError(f"lr_scheduler {name!r} is not a schedule this transformers version has") from None
    steps = {"num_warmup_steps": warmup, "num_training_steps": total_steps}
    arguments: dict[str, Any] = {
        "constant": {},
        "constant_with_warmup": {"num_warmup_steps": warmup},
        "inverse_sqrt": {"num_warmup_steps": warmup, "timescale": timescale},
        "cosine_with_restarts": {**steps, "num_cycles": num_cycles},
        "polynomial": {**steps, "power": power},
        "cosine_with_min_lr": {**steps, "num_cycles": num_cycles / 2, "min_lr_rate": min_lr_ratio},
        "linear": steps,
        "cosine": steps,
    }.get(name)
    if name == "constant":
        _no_warmup('lr_scheduler "constant" (use constant_with_warmup)', warmup, warmup_steps)
    if name == "warmup_stable_decay":
        if warmup + decay > total_steps:
            raise ConfigError(f"lr_warmup_steps ({warmup}) and lr_decay_steps ({decay}) add up to more than the "
                              f"{total_steps} training steps; shorten them")
        arguments = {"num_warmup_steps": warmup, "num_stable_steps": total_steps - warmup - decay,
                     "num_decay_steps": decay, "num_cycles": num_cycles / 2,
                     "min_lr_ratio": min_lr_ratio if min_lr_ratio is not None else 0.0}
    if arguments is None:
        reason = REFUSED_LR_SCHEDULERS.get(name, "sd-scripts passes it num_decay_steps, which it does not take")
        raise ConfigError(f"lr_scheduler {name} is not supported: {reason}")
    return _call(name, function, optimizer, {**arguments, **_unrepeated(name, arguments, kwargs)})


def _no_warmup(what: str, warmup: int, given: int | float) -> None:
    """sd-scripts' wrap_check_needless_num_warmup_steps: these schedules stop on any warmup step."""
    if warmup != 0:
        raise ConfigError(f"lr_warmup_steps {given} ({warmup} steps): {what} takes no warmup (sd-scripts stops on it); "
                          "set lr_warmup_steps = 0")


def _unrepeated(name: str, arguments: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    repeated = sorted(set(arguments) & set(kwargs))
    if repeated:
        raise ConfigError(f"lr_scheduler_args {', '.join(repeated)}: lr_scheduler {name} gets it from its own key "
                          "(sd-scripts stops on the repeat)")
    return kwargs


def _call(name: str, function, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]):
    try:
        return function(optimizer, **kwargs)
    except TypeError as error:
        raise ConfigError(f"lr_scheduler_args do not fit lr_scheduler {name}: {error}") from None
    except ValueError as error:
        raise ConfigError(f"lr_scheduler {name} cannot be built with these settings: {error}") from None


def _custom_scheduler(scheduler_type: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]):
    """``X`` from torch.optim.lr_scheduler, or ``module.Class``, called with the optimizer and lr_scheduler_args."""
    module_name, _, class_name = scheduler_type.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
    except Exception as error:  # noqa: BLE001 - any module can fail to import; the key is named either way
        raise ConfigError(f"lr_scheduler_type {scheduler_type}: module {module_name} cannot be imported "
                          f"({type(error).__name__}: {error})") from None
    scheduler_class = getattr(module, class_name, None)
    if scheduler_class is None:
        raise ConfigError(f"lr_scheduler_type {scheduler_type}: no class {class_name} in "
                          f"{module_name or 'torch.optim.lr_scheduler'}")
    if isinstance(scheduler_class, type) and issubclass(scheduler_class, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError(f"lr_scheduler_type {scheduler_type} steps on a validation loss, which is not computed")
    try:
        scheduler = scheduler_class(optimizer, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"lr_scheduler_args do not fit lr_scheduler_type {scheduler_type}: {error}") from None
    missing = [method for method in ("step", "get_last_lr", "state_dict", "load_state_dict")
               if not callable(getattr(scheduler, method, None))]
    if missing:
        raise ConfigError(f"lr_scheduler_type {scheduler_type} has no {', '.join(missing)}; the loop steps it, logs "
                          "its lr and saves its state")
    return scheduler
