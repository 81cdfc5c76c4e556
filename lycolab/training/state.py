"""Training state for ``save_state`` / ``resume``: everything needed to continue a run bit for bit.

A state is a folder ``{output_name}-{epoch:06d}-state``, ``{output_name}-step{step:08d}-state`` or
``{output_name}-state`` (the end of the run), as sd-scripts names them. It holds two files: ``state.safetensors``
(adapter weights, optimizer tensors, RNG states) and ``state.json`` (position in the run, optimizer and scheduler
settings, loss history). No pickle is involved, so a state from anywhere is safe to load. The folder is written
beside its final name and renamed into place, so a run killed at any moment leaves only complete states.

A folder damaged afterwards (a Drive sync cut short, a full disk, a hand edit) is refused with one line that names
it and the next older complete state of the same run, for an explicit ``resume`` folder and for
``resume = "latest"`` alike: silently continuing from an older state would quietly throw away training the user
believes is saved, so the user decides. ``state.json`` records a SHA-256 of ``state.safetensors``, which catches
damage that leaves the file's size and header intact.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lycolab.files import atomic_directory

STATE_FORMAT = "lycolab-training-state"
STATE_VERSION = 1
TENSORS_FILE = "state.safetensors"
INFO_FILE = "state.json"
TENSOR_MARK = "__tensor__"
CHECKSUM_KEY = "tensors_sha256"
POSITION_KEYS = ("step", "epoch", "next_batch", "seed")
PICKLED = ("this state was written by sd-scripts/accelerate as pickles, which lycolab does not load; continue "
           "from its .safetensors with network_weights instead")
# {name}-{epoch:06d}-state, {name}-step{step:08d}-state, {name}-state; the non-greedy name keeps "my-run-state" whole
STATE_FOLDER = re.compile(r"(?P<name>.+?)-(?:(?P<epoch>\d{6})-|step(?P<step>\d{8})-)?state")


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
    """Write the state folder atomically, with a checksum of its tensors file."""
    info = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": state.step, "epoch": state.epoch,
            "next_batch": state.next_batch, "seed": state.seed, **state.info}

    def write(folder: Path) -> None:
        save_file(state.tensors, str(folder / TENSORS_FILE))  # its own temporary file stays inside the folder
        info[CHECKSUM_KEY] = _sha256(folder / TENSORS_FILE)
        (folder / INFO_FILE).write_text(json.dumps(info), encoding="utf-8")

    return atomic_directory(directory, write)


def load_state(directory: str | Path) -> TrainingState:
    """Read a state folder written by :func:`save_state`; anything else gets one line naming the folder and, for a
    damaged one, the next older complete state of the same run."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StateError(f"{directory}: resume folder not found; point resume at a *-state folder in output_dir")
    if _is_pickled(directory):
        raise StateError(f"{directory}: {PICKLED}")
    info, reason = inspect_state(directory)
    if reason is None:
        try:
            tensors = load_file(str(directory / TENSORS_FILE))
        except (OSError, SafetensorError) as error:
            reason = f"{TENSORS_FILE} cannot be read ({' '.join(str(error).split())[:120]})"
    if reason is not None:
        raise StateError(damaged_message(directory, reason))
    info.pop(CHECKSUM_KEY, None)
    position = {key: info.pop(key) for key in POSITION_KEYS}
    return TrainingState(**position, info=info, tensors=tensors)


def inspect_state(directory: Path) -> tuple[dict[str, Any], str | None]:
    """The folder's ``state.json`` and why the folder cannot be resumed from (None when it is complete).

    Checks everything short of loading the tensors: the JSON and its format, the tensors file's header and size,
    every tensor the JSON refers to, and the checksum.
    """
    if _is_pickled(directory):
        return {}, PICKLED
    info, reason = _read_info(directory)
    if reason is None:
        reason = _check_tensors(directory, info)
    return info, reason


def _is_pickled(directory: Path) -> bool:
    return not (directory / INFO_FILE).is_file() and any(
        path.suffix in (".bin", ".pkl") for path in directory.iterdir())


def _read_info(directory: Path) -> tuple[dict[str, Any], str | None]:
    try:
        info = json.loads((directory / INFO_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, f"{INFO_FILE} is missing"
    except (OSError, ValueError) as error:
        return {}, f"{INFO_FILE} is unreadable or not JSON ({type(error).__name__})"
    if not isinstance(info, dict) or info.get("format") != STATE_FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        return {}, f"{INFO_FILE} is not a lycolab training state (format {found!r})"
    if info.get("version") != STATE_VERSION:
        return {}, f"{INFO_FILE} has state version {info.get('version')!r}, this lycolab reads {STATE_VERSION}"
    wrong = [key for key in POSITION_KEYS if type(info.get(key)) is not int]
    if wrong:
        return {}, f"{INFO_FILE} lacks a whole-number {', '.join(wrong)}"
    return info, None


def _check_tensors(directory: Path, info: dict[str, Any]) -> str | None:
    path = directory / TENSORS_FILE
    if not path.is_file():
        return f"{TENSORS_FILE} is missing"
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    except (OSError, SafetensorError) as error:
        return f"{TENSORS_FILE} is truncated or damaged ({' '.join(str(error).split())[:120]})"
    needed = {"rng/torch"} | set(_tensor_references(info))
    missing = sorted(needed - keys) + ([] if any(key.startswith("network/") for key in keys) else ["network/*"])
    if missing:
        return f"tensors missing from {TENSORS_FILE}: {', '.join(missing[:3])}" + (" …" if len(missing) > 3 else "")
    if CHECKSUM_KEY in info and info[CHECKSUM_KEY] != _sha256(path):
        return f"{TENSORS_FILE} does not match the checksum in {INFO_FILE} (changed or damaged after saving)"
    return None


def _tensor_references(value: Any) -> list[str]:
    """Every tensor key :func:`pack` put in the JSON."""
    if isinstance(value, dict):
        if isinstance(value.get(TENSOR_MARK), str):
            return [value[TENSOR_MARK]]
        return [key for item in value.values() for key in _tensor_references(item)]
    if isinstance(value, list):
        return [key for item in value for key in _tensor_references(item)]
    return []


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def damaged_message(folder: Path, reason: str) -> str:
    """One line: the folder, what is wrong, and the next older complete state of the same run to resume from."""
    match = STATE_FOLDER.fullmatch(folder.name)
    name = match.group("name") if match else None
    older = _next_older_complete(folder, name) if name else None
    message = f"{folder}: cannot resume from this training state, {reason}"
    if older is not None:
        return (f'{message}; the next older complete state is {older.name}: set resume = "{older}" (or delete '
                f'{folder.name} and resume = "latest" takes it)')
    if name:
        return f"{message}; there is no older complete state of {name} in {folder.parent}: start without resume"
    return f"{message}; point resume at another *-state folder"


def state_folders(output_dir: str | Path, output_name: str) -> list[Path]:
    """The state folders of this output name, newest first (hidden partial folders never count).

    Newest means most steps (from ``state.json``, or a ``-stepN-`` name when that is unreadable); a folder whose
    step cannot be known is placed by modification time among the others.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    folders = [path for path in output_dir.iterdir() if path.is_dir() and _run_name(path) == output_name]
    known = {folder: _step_of(folder) for folder in folders}
    mtime = {folder: folder.stat().st_mtime_ns for folder in folders}

    def order(folder: Path) -> tuple[int, int]:
        step = known[folder]
        if step is None:  # after the newest folder with a known step written before it
            step = max((s for f, s in known.items() if s is not None and mtime[f] <= mtime[folder]), default=-1)
        return step, mtime[folder]

    return sorted(folders, key=order, reverse=True)


def _run_name(folder: Path) -> str | None:
    match = STATE_FOLDER.fullmatch(folder.name)
    return match.group("name") if match and not folder.name.startswith(".") else None


def _step_of(folder: Path) -> int | None:
    info, reason = _read_info(folder)
    if reason is None:
        return info["step"]
    match = STATE_FOLDER.fullmatch(folder.name)
    return int(match.group("step")) if match and match.group("step") else None


def _next_older_complete(folder: Path, name: str) -> Path | None:
    folders = state_folders(folder.parent, name)
    older = folders[folders.index(folder) + 1:] if folder in folders else folders
    return next((candidate for candidate in older if inspect_state(candidate)[1] is None), None)


def find_latest_state(output_dir: str | Path, output_name: str) -> Path | None:
    """The newest complete state folder of this output name, passing over damaged ones."""
    return next((folder for folder in state_folders(output_dir, output_name) if inspect_state(folder)[1] is None),
                None)


def resume_folder(resume: str, output_dir: str | Path, output_name: str) -> Path | None:
    """The folder ``resume`` means: itself, or for ``"latest"`` the newest state of this run (None when there is
    none yet). A damaged newest state is refused rather than passed over, naming the older one to use."""
    if resume != "latest":
        return Path(resume)
    folders = state_folders(output_dir, output_name)
    if not folders:
        return None
    reason = inspect_state(folders[0])[1]
    if reason is not None:
        raise StateError(damaged_message(folders[0], reason))
    return folders[0]
