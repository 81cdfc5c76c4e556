"""Loss and learning-rate history: what the progress bar, the plots and a resumed run continue from."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lycolab.files import atomic_write

AVERAGE_WINDOW = 20


@dataclass
class LossHistory:
    """Every optimisation step's loss and learning rates (one per parameter group); people read the average."""

    steps: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    learning_rates: list[list[float]] = field(default_factory=list)

    def add(self, step: int, epoch: int, loss: float, learning_rates: list[float]) -> None:
        self.steps.append(step)
        self.epochs.append(epoch)
        self.losses.append(loss)
        self.learning_rates.append(list(learning_rates))

    def average(self, window: int = AVERAGE_WINDOW) -> float:
        """Mean of the last ``window`` losses (sd-scripts' ``avr_loss``)."""
        recent = self.losses[-window:]
        return sum(recent) / len(recent) if recent else float("nan")

    def moving_average(self, window: int = AVERAGE_WINDOW) -> list[float]:
        averages, total = [], 0.0
        for index, loss in enumerate(self.losses):
            total += loss
            if index >= window:
                total -= self.losses[index - window]
            averages.append(total / min(index + 1, window))
        return averages

    def to_dict(self) -> dict[str, list]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, list]) -> LossHistory:
        return cls(**{key: list(values.get(key, [])) for key in ("steps", "epochs", "losses", "learning_rates")})

    def figure(self, title: str = "training loss"):
        """Loss per step with its moving average, on a matplotlib Figure that needs no GUI backend."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(8, 4), dpi=100)
        axes = figure.subplots()
        axes.plot(self.steps, self.losses, color="#9bb7d4", linewidth=0.8, label="loss")
        axes.plot(self.steps, self.moving_average(), color="#1f4e79", linewidth=1.8, label="moving average")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(title)
        axes.legend(loc="upper right")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        return figure

    def png_bytes(self, title: str = "training loss") -> bytes:
        buffer = io.BytesIO()
        self.figure(title).savefig(buffer, format="png")
        return buffer.getvalue()

    def plot(self, path: str | Path, title: str = "training loss") -> Path:
        figure = self.figure(title)
        return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
