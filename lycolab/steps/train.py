"""Step 06: train from the workspace's two TOML files, with a live loss plot and sample grids in the notebook.

Quick overrides (learning rates, epochs) apply to this run only, so the step can be re-run without going back to
step 05. ``resume`` is on by default: after a disconnect the notebook is opened again in a new runtime, and the
newest state folder of an unfinished run (in ``output/``, on Drive) is found and continued; a finished run's final
state starts a new run instead. On a runtime without a GPU the step stops in one line unless the model is the tiny
demo or ``train_on_cpu`` is ticked: an SD 1.5 run on Colab's CPU would take days.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lycolab.colab import Workspace
from lycolab.display import Table, one_line_errors

logger = logging.getLogger(__name__)


def _number(text: str, key: str) -> float | None:
    text = str(text).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{key} must be a number like 1e-4, or empty to keep step 05's value (got {text!r})") from None


def has_accelerator() -> bool:
    """A CUDA GPU (or Apple's MPS) that training can use."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def check_runtime(model: str, train_on_cpu: bool) -> None:
    """Refuse a CPU runtime for a real model, in one line that says how to get a GPU."""
    from lycolab.models.tiny import is_tiny_model

    if train_on_cpu or has_accelerator() or is_tiny_model(model):
        return
    raise ValueError("this runtime has no GPU: in Colab choose Runtime → Change runtime type → T4 GPU and run this "
                     "notebook again (it installs lycolab itself and resumes from the last save), or tick "
                     "train_on_cpu to train on the CPU anyway (days for a real model)")


def saved_state(config) -> Path | None:
    """The newest complete state of this run's output name that an unfinished run left, or None."""
    from lycolab.training.state import find_latest_state, inspect_state

    folder = find_latest_state(config.output_dir, config.output_name or "last")
    if folder is None:
        return None
    info, _ = inspect_state(folder)
    finished = isinstance(info.get("total_steps"), int) and info["step"] >= info["total_steps"]
    return None if finished else folder


def _resume_choice(config, resume: bool) -> str | None:
    if not resume:
        return None
    folder = saved_state(config)
    if folder is None:
        logger.info("no unfinished run of %s to resume: starting from the beginning", config.output_name or "last")
        return None
    logger.info("found %s from a run that did not finish: resuming from it (untick resume to start over)",
                folder.name)
    return str(folder)


def _overrides(unet_lr: str, text_encoder_lr: str, num_epochs: str) -> dict:
    overrides = {key: value for key, value in (("unet_lr", _number(unet_lr, "unet_lr")),
                                               ("text_encoder_lr", _number(text_encoder_lr, "text_encoder_lr")),
                                               ("max_train_epochs", _number(num_epochs, "num_epochs")))
                 if value is not None}
    if "max_train_epochs" in overrides:
        overrides["max_train_epochs"] = int(overrides["max_train_epochs"])
    return overrides


def _config(workspace: Workspace, overrides: dict):
    from lycolab.config import load_config

    if not workspace.config_file.is_file():
        raise ValueError(f"{workspace.config_file} does not exist; run step 05 first")
    return load_config(workspace.config_file, overrides=overrides)


@one_line_errors
def estimate(workspace: Workspace, unet_lr: str = "", text_encoder_lr: str = "", num_epochs: str = "",
             device: str = ""):
    """Steps, time, VRAM and whether the run fits a Colab session on this runtime's GPU (or ``device``)."""
    from lycolab.estimate import estimate as estimate_run

    config = _config(workspace, _overrides(unet_lr, text_encoder_lr, num_epochs))
    return estimate_run(config, device.strip() or None)


@one_line_errors
def run(workspace: Workspace, unet_lr: str = "", text_encoder_lr: str = "", num_epochs: str = "",
        resume: bool = True, train_on_cpu: bool = False, live: bool = True):
    """Train as configured in step 05; returns the TrainResult (files written, loss history)."""
    from lycolab.training import LiveDisplay, train

    overrides = _overrides(unet_lr, text_encoder_lr, num_epochs)
    config = _config(workspace, overrides)
    check_runtime(str(config.pretrained_model_name_or_path or ""), train_on_cpu)
    config.resume = _resume_choice(config, resume)  # a folder path: nothing to validate again
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
