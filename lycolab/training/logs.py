"""Per-step training logs: CSV and JSON Lines written as the run goes, and TensorBoard when ``logging_dir`` is set.

The CSV and JSONL files are appended and flushed every step, so a crashed or killed run keeps its log; a resumed run
rewrites them from the history stored in its state and carries on. TensorBoard events go to
``logging_dir/{log_prefix}{YYYYmmddHHMMSS}`` with sd-scripts' tags (``loss/current``, ``loss/average``,
``lr/unet``, ``lr/textencoder``), so existing dashboards keep working.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lycolab.training.history import LossHistory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRecord:
    """One optimisation step as logged and handed to callbacks."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    average_loss: float
    learning_rates: dict[str, float]


class TrainingLog:
    """Writes ``{prefix}loss.csv`` and ``{prefix}loss.jsonl`` in ``log_dir`` (and TensorBoard events if asked)."""

    def __init__(self, log_dir: str | Path, prefix: str, group_names: list[str], history: LossHistory,
                 tensorboard: bool):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.group_names = group_names
        self.history = history
        self.csv_path = self.log_dir / f"{prefix}loss.csv"
        self.jsonl_path = self.log_dir / f"{prefix}loss.jsonl"
        self._start_files()
        self.tensorboard_dir: Path | None = None
        self._writer = self._tensorboard(prefix) if tensorboard else None

    def _columns(self) -> list[str]:
        return ["step", "epoch", "loss", "average_loss", *(f"lr_{name}" for name in self.group_names)]

    def _start_files(self) -> None:
        """Fresh files holding the history so far (empty for a new run, the earlier steps for a resumed one)."""
        self._csv_handle = self.csv_path.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_handle)
        self._csv.writerow(self._columns())
        self._jsonl_handle = self.jsonl_path.open("w", encoding="utf-8")
        averages = self.history.moving_average()
        rows = zip(self.history.steps, self.history.epochs, self.history.losses, averages,
                   self.history.learning_rates, strict=True)
        for step, epoch, loss, average, learning_rates in rows:
            self._write_row([step, epoch, loss, average, *learning_rates])
        self._flush()

    def _tensorboard(self, prefix: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("no TensorBoard events: tensorboard is not installed (pip install tensorboard); "
                        "the CSV/JSONL logs are written")
            return None
        self.tensorboard_dir = self.log_dir / f"{prefix}{time.strftime('%Y%m%d%H%M%S')}"
        return SummaryWriter(str(self.tensorboard_dir))

    def _write_row(self, row: list) -> None:
        self._csv.writerow(row)
        self._jsonl_handle.write(json.dumps(dict(zip(self._columns(), row, strict=False))) + "\n")

    def _flush(self) -> None:
        self._csv_handle.flush()
        self._jsonl_handle.flush()

    def log(self, step: int, total_steps: int, epoch: int, loss: float, learning_rates: list[float],
            scalars: dict[str, float] | None = None) -> StepRecord:
        """Add one step to the history and every log; returns the record callbacks receive. ``scalars`` are more
        TensorBoard values under sd-scripts' names (e.g. ``max_norm/keys_scaled``)."""
        learning_rates = [float(rate) for rate in learning_rates]  # AdaFactor's own schedule reports tensors
        self.history.add(step, epoch, loss, learning_rates)
        average = self.history.average()
        self._write_row([step, epoch, loss, average, *learning_rates])
        self._flush()
        named = dict(zip(self.group_names, learning_rates, strict=False))
        if self._writer is not None:
            self._writer.add_scalar("loss/current", loss, step)
            self._writer.add_scalar("loss/average", average, step)
            for name, value in named.items():
                self._writer.add_scalar(f"lr/{name}", value, step)
            for name, value in (scalars or {}).items():
                self._writer.add_scalar(name, value, step)
        return StepRecord(step, total_steps, epoch, loss, average, named)

    def close(self) -> None:
        self._csv_handle.close()
        self._jsonl_handle.close()
        if self._writer is not None:
            self._writer.close()
