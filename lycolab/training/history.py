"""Loss and learning-rate history: a CSV for tools and a PNG plot for people."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LossHistory:
    """Every optimisation step's loss and lr; the moving average is what the progress bar and plot show."""

    steps: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)

    def add(self, step: int, epoch: int, loss: float, learning_rate: float) -> None:
        self.steps.append(step)
        self.epochs.append(epoch)
        self.losses.append(loss)
        self.learning_rates.append(learning_rate)

    def moving_average(self, window: int = 20) -> list[float]:
        averages, total = [], 0.0
        for index, loss in enumerate(self.losses):
            total += loss
            if index >= window:
                total -= self.losses[index - window]
            averages.append(total / min(index + 1, window))
        return averages

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "epoch", "loss", "lr"])
            writer.writerows(zip(self.steps, self.epochs, self.losses, self.learning_rates))
        return path

    def plot(self, path: str | Path, title: str = "training loss") -> Path:
        """Loss per step with its moving average; written with the Agg backend so it works headless."""
        import matplotlib

        matplotlib.use("Agg", force=False)
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        return path
