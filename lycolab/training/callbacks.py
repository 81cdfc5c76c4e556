"""Hooks into a training run, and the live view the notebooks show: loss plot redrawn in place, sample grids.

``train(config, callbacks=[LiveDisplay()])`` is all a notebook cell needs; outside a notebook the display falls
back to nothing (the tqdm bar and the files on disk remain).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lycolab.training.history import LossHistory
from lycolab.training.logs import StepRecord

logger = logging.getLogger(__name__)


class TrainingCallback:
    """Override any of these; the defaults do nothing. Called on the main process only."""

    def on_step(self, record: StepRecord, history: LossHistory) -> None:
        """After each optimisation step."""

    def on_sample(self, images: list[Path], grid: Path) -> None:
        """After each sampling round, with its images and their grid."""

    def on_save(self, path: Path) -> None:
        """After an adapter file or a state folder is written."""

    def on_end(self, result: Any) -> None:
        """After the run, with its TrainResult."""


def notebook_display() -> Callable | None:
    """IPython's ``display`` when running in a notebook kernel, else None."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return None
    shell = get_ipython()
    return display if shell is not None and getattr(shell, "kernel", None) is not None else None


class LiveDisplay(TrainingCallback):
    """The notebook view of a run: one loss plot updated in place at most every ``every_seconds``, plus each
    sample grid as it is made (so epochs can be compared while training goes on)."""

    def __init__(self, every_seconds: float = 10.0, title: str = "training loss", display: Callable | None = None):
        self.every_seconds = every_seconds
        self.title = title
        self.display = display if display is not None else notebook_display()
        self._plot_handle = None
        self._last_drawn = float("-inf")
        self.plots_drawn = 0

    def on_step(self, record: StepRecord, history: LossHistory) -> None:
        now = time.monotonic()
        if now - self._last_drawn >= self.every_seconds or record.step == record.total_steps:
            self._last_drawn = now
            self._draw(history)

    def _draw(self, history: LossHistory) -> None:
        if self.display is None or not history.steps:
            return
        from IPython.display import Image

        image = Image(data=history.png_bytes(self.title), format="png")
        if self._plot_handle is None:
            self._plot_handle = self.display(image, display_id=True)
        else:
            self._plot_handle.update(image)
        self.plots_drawn += 1

    def on_sample(self, images: list[Path], grid: Path) -> None:
        if self.display is None:
            logger.info("samples: %s", grid)
            return
        from IPython.display import Image, Markdown

        self.display(Markdown(f"**{grid.stem}**"))
        self.display(Image(filename=str(grid)))

    def on_end(self, result: Any) -> None:
        self._draw(result.history)
