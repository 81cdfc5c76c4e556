"""Learning-rate schedules by sd-scripts' ``lr_scheduler`` name (diffusers implements them)."""

from __future__ import annotations

import torch


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       num_cycles: int = 1, power: float = 1.0):
    """constant / constant_with_warmup / linear / cosine / cosine_with_restarts / polynomial, with warmup."""
    from diffusers.optimization import get_scheduler

    kwargs = {}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    if name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, **kwargs)
