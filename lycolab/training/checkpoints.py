"""Names of the files a run saves, and ``save_last_n_epochs`` / ``save_last_n_steps`` pruning, as sd-scripts does.

Adapter files are ``{name}-{epoch:06d}.safetensors`` (every N epochs), ``{name}-step{step:08d}.safetensors`` (every N
steps) and ``{name}.safetensors`` (the end); each may have a ``…-state`` folder beside it when ``save_state`` is on.
As in sd-scripts, ``save_last_n_epochs`` keeps that many epoch files, and states too unless
``save_last_n_epochs_state`` says how many states to keep (a state is hundreds of MB on a 15 GB Drive); the same
for steps.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path


def epoch_file(output_dir: str | Path, name: str, epoch: int) -> Path:
    return Path(output_dir) / f"{name}-{epoch:06d}.safetensors"


def step_file(output_dir: str | Path, name: str, step: int) -> Path:
    return Path(output_dir) / f"{name}-step{step:08d}.safetensors"


def final_file(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / f"{name}.safetensors"


def _numbered(output_dir: Path, pattern: str) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    regex = re.compile(pattern)
    for path in output_dir.iterdir():
        match = regex.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(1)), []).append(path)
    return found


def _remove(paths: list[Path]) -> list[Path]:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return paths


def prune_epochs(output_dir: str | Path, name: str, keep: int | None, keep_states: int | None = None
                 ) -> list[Path]:
    """Remove epoch files older than the newest ``keep`` epochs, and epoch states older than the newest
    ``keep_states`` (default: ``keep``); None keeps all. Returns what was removed."""
    removed = []
    for kind, count in ((r"\.safetensors", keep), ("-state", keep_states or keep)):
        numbered = _numbered(Path(output_dir), rf"{re.escape(name)}-(\d{{6}}){kind}")
        old = sorted(numbered)[:-count] if count else []
        removed += _remove([path for epoch in old for path in numbered[epoch]])
    return removed


def prune_steps(output_dir: str | Path, name: str, current_step: int, keep_steps: int | None,
                keep_state_steps: int | None = None) -> list[Path]:
    """Remove step files more than ``keep_steps`` steps older than ``current_step``, and step states more than
    ``keep_state_steps`` (default: ``keep_steps``) older; None keeps all. Returns what was removed."""
    removed = []
    for kind, count in ((r"\.safetensors", keep_steps), ("-state", keep_state_steps or keep_steps)):
        numbered = _numbered(Path(output_dir), rf"{re.escape(name)}-step(\d{{8}}){kind}")
        removed += _remove([path for step, paths in numbered.items() if count and step < current_step - count
                            for path in paths])
    return removed
