"""Training state for ``save_state`` / ``resume``: everything needed to continue a run bit for bit.

A state is a folder ``{output_name}-{epoch:06d}-state``, ``{output_name}-step{step:08d}-state`` or
``{output_name}-state`` (the end of the run), as sd-scripts names them. It holds two files: ``state.safetensors``
(adapter weights, optimizer tensors, RNG states) and ``state.json`` (position in the run, optimizer and scheduler
settings, loss history). No pickle is involved, so a state from anywhere is safe to load. The folder is written
beside its final name and renamed into place, so a run killed at any moment leaves only complete states.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lycolab.files import atomic_directory

STATE_FORMAT = "lycolab-training-state"
STATE_VERSION = 1
TENSORS_FILE = "state.safetensors"
INFO_FILE = "state.json"
TENSOR_MARK = "__tensor__"


class StateError(ValueError):
    """A state folder that cannot be resumed from; the message names it and what to do."""


@dataclass
class TrainingState:
    """What ``resume`` restores: where the run was, and the tensors and settings to continue from there."""

    step: int
    epoch: int
    next_batch: int
    seed: int
    info: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved under ``prefix/`` with the prefix removed (e.g. the adapter's state dict)."""
        start = len(prefix) + 1
        return {key[start:]: value for key, value in self.tensors.items() if key.startswith(prefix + "/")}


def pack(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A nested state dict → JSON-safe structure; tensors move into ``tensors`` under path-like keys.

    Dicts keep non-string keys (optimizer states are keyed by parameter number) and tuples stay tuples.
    """
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous().clone()
        return {TENSOR_MARK: prefix}
    if isinstance(value, dict):
        return {"__dict__": [[key, pack(item, f"{prefix}/{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [pack(item, f"{prefix}/{index}", tensors) for index, item in enumerate(value)]}
    if isinstance(value, list):
        return [pack(item, f"{prefix}/{index}", tensors) for index, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise StateError(f"cannot save a {type(value).__name__} in the training state (at {prefix})")


def unpack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`pack`."""
    if isinstance(value, list):
        return [unpack(item, tensors) for item in value]
    if isinstance(value, dict):
        if TENSOR_MARK in value:
            return tensors[value[TENSOR_MARK]]
        if "__tuple__" in value:
            return tuple(unpack(item, tensors) for item in value["__tuple__"])
        return {key: unpack(item, tensors) for key, item in value["__dict__"]}
    return value


def state_dir_name(output_name: str, epoch: int | None = None, step: int | None = None) -> str:
    """sd-scripts' state folder names: per epoch, per step, or the end of the run."""
    if epoch is not None:
        return f"{output_name}-{epoch:06d}-state"
    if step is not None:
        return f"{output_name}-step{step:08d}-state"
    return f"{output_name}-state"


def save_state(directory: str | Path, state: TrainingState) -> Path:
    """Write the state folder atomically."""
    info = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": state.step, "epoch": state.epoch,
            "next_batch": state.next_batch, "seed": state.seed, **state.info}

    def write(folder: Path) -> None:
        save_file(state.tensors, str(folder / TENSORS_FILE))
        (folder / INFO_FILE).write_text(json.dumps(info), encoding="utf-8")

    return atomic_directory(directory, write)


def load_state(directory: str | Path) -> TrainingState:
    """Read a state folder written by :func:`save_state`; anything else gets a one-line reason."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StateError(f"{directory}: resume folder not found; point resume at a *-state folder in output_dir")
    pickled = any(directory.glob("*.bin")) or any(directory.glob("*.pkl"))
    if pickled and not (directory / INFO_FILE).is_file():
        raise StateError(f"{directory}: this state was written by sd-scripts/accelerate as pickles, which lycolab "
                         "does not load; continue from its .safetensors with network_weights instead")
    try:
        info = json.loads((directory / INFO_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / TENSORS_FILE))
    except (OSError, ValueError, SafetensorError) as error:
        raise StateError(f"{directory}: not a complete lycolab training state ({error}); "
                         "resume from an earlier *-state folder") from None
    if info.get("format") != STATE_FORMAT or info.get("version") != STATE_VERSION:
        raise StateError(f"{directory}: not a lycolab training state (format {info.get('format')!r})")
    position = {key: info.pop(key) for key in ("step", "epoch", "next_batch", "seed")}
    return TrainingState(**position, info=info, tensors=tensors)


def find_latest_state(output_dir: str | Path, output_name: str) -> Path | None:
    """The complete state folder of this output name with the most steps (hidden partial folders never count)."""
    best: tuple[int, Path] | None = None
    for folder in Path(output_dir).glob(f"{output_name}-*state"):
        try:
            step = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))["step"]
        except (OSError, ValueError, KeyError):
            continue
        if (folder / TENSORS_FILE).is_file() and (best is None or step > best[0]):
            best = (step, folder)
    return best[1] if best else None
