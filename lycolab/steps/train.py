"""Step 06: train from the workspace's two TOML files, with a live loss plot and sample grids in the notebook.

Quick overrides (learning rates, epochs) apply to this run only, so the step can be re-run without going back to
step 05; ``resume`` continues from the newest ``*-state`` folder in ``output/`` (written when save_state is on).
"""

from __future__ import annotations

from lycolab.colab import Workspace
from lycolab.display import Table, one_line_errors


def _number(text: str, key: str) -> float | None:
    text = str(text).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{key} must be a number like 1e-4, or empty to keep step 05's value (got {text!r})") from None


@one_line_errors
def run(workspace: Workspace, unet_lr: str = "", text_encoder_lr: str = "", num_epochs: str = "",
        resume: bool = False, live: bool = True):
    """Train as configured in step 05; returns the TrainResult (files written, loss history)."""
    from lycolab.config import load_config
    from lycolab.training import LiveDisplay, train

    if not workspace.config_file.is_file():
        raise ValueError(f"{workspace.config_file} does not exist; run step 05 first")
    overrides = {key: value for key, value in (("unet_lr", _number(unet_lr, "unet_lr")),
                                               ("text_encoder_lr", _number(text_encoder_lr, "text_encoder_lr")),
                                               ("max_train_epochs", _number(num_epochs, "num_epochs")))
                 if value is not None}
    if "max_train_epochs" in overrides:
        overrides["max_train_epochs"] = int(overrides["max_train_epochs"])
    if resume:
        overrides["resume"] = "latest"
    config = load_config(workspace.config_file, overrides=overrides)
    return train(config, callbacks=[LiveDisplay()] if live else [])


def summary(result) -> Table:
    """What the run wrote: each adapter file with its epoch, then the sample grids and logs."""
    rows = [{"file": path.name, "size": f"{path.stat().st_size / 2**20:.1f} MiB"} for path in result.saved_files]
    notes = [f"{result.total_steps} steps in {result.seconds:.0f} s; final average loss "
             f"{result.history.average():.4f}"]
    if result.resumed_from:
        notes.append(f"resumed from {result.resumed_from.name}")
    notes += [f"loss log: {result.loss_csv}", f"samples: {len(result.sample_files)} images, "
              f"{len(result.grid_files)} grids"]
    return Table(rows, title="trained", notes=notes)
