"""Training: the accelerate loop, optimizers, schedules, the loss, sampling and history."""

from lycolab.training.loop import TrainingError, TrainResult, train

__all__ = ["TrainResult", "TrainingError", "train"]
