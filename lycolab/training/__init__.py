"""Training: the accelerate loop, optimizers, schedules, the loss, sampling, state, logs and callbacks."""

from lycolab.training.callbacks import LiveDisplay, TrainingCallback
from lycolab.training.loop import TrainingError, TrainResult, train

__all__ = ["LiveDisplay", "TrainResult", "TrainingCallback", "TrainingError", "train"]
