"""Learning-rate schedules by sd-scripts' ``lr_scheduler`` name (diffusers and transformers implement them)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       num_cycles: int = 1, power: float = 1.0, initial_lr: float = 0.0):
    """constant / constant_with_warmup / linear / cosine / cosine_with_restarts / polynomial / adafactor.

    ``adafactor`` reports the step size AdaFactor chose itself (``initial_lr`` until its first step); it only works
    with ``optimizer_type = "AdaFactor"`` and ``relative_step``, which is the default there.
    """
    if name == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise ValueError('lr_scheduler "adafactor" needs optimizer_type = "AdaFactor"')
        return AdafactorSchedule(optimizer, initial_lr)
    from diffusers.optimization import get_scheduler

    kwargs = {}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    if name == "constant" and warmup_steps > 0:
        logger.info("lr_warmup_steps with lr_scheduler constant: using constant_with_warmup")
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, **kwargs)
