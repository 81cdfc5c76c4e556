"""The workspace every notebook opens first: on Google Drive in Colab, ``./workspace/<project>`` elsewhere.

Each step notebook starts with ``ws = open_workspace("my_lora")`` and reads what earlier steps left on disk, so any
single step can be re-run after a runtime restart. ``google.colab`` is imported only inside Colab.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lycolab.files import atomic_write

DRIVE_MOUNT = Path("/content/drive")
DRIVE_ROOT = DRIVE_MOUNT / "MyDrive" / "lycolab"
SUBFOLDERS = ("config", "train_data", "reg_data", "models", "output", "output/sample", "logs", "state")


@dataclass(frozen=True)
class Workspace:
    """The project's folders (DESIGN.md §2); every path a step reads or writes comes from here."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def config_file(self) -> Path:
        return self.config / "config_file.toml"

    @property
    def dataset_config(self) -> Path:
        return self.config / "dataset_config.toml"

    @property
    def train_data(self) -> Path:
        return self.root / "train_data"

    @property
    def reg_data(self) -> Path:
        return self.root / "reg_data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def samples(self) -> Path:
        return self.output / "sample"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def choices_file(self) -> Path:
        return self.config / "workspace.json"

    def recall(self, key: str, default: Any = None) -> Any:
        """A choice an earlier step saved (the model path, the caption extension …), or ``default``."""
        try:
            return json.loads(self.choices_file.read_text(encoding="utf-8")).get(key, default)
        except (OSError, ValueError):
            return default

    def remember(self, **choices: Any) -> None:
        """Save choices for later steps, on disk so they survive a runtime restart (never tokens)."""
        try:
            saved = json.loads(self.choices_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
        saved.update(choices)
        text = json.dumps(saved, indent=2, sort_keys=True)
        atomic_write(self.choices_file, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def in_colab() -> bool:
    return "google.colab" in sys.modules or Path("/content").is_dir() and _colab_importable()


def _colab_importable() -> bool:
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True


def project_name(name: str) -> str:
    """A folder-safe project name (letters, digits, ``-``, ``_``, ``.``); refuses names that would escape."""
    cleaned = re.sub(r"[^\w.-]+", "_", name.strip()).strip("._")
    if not cleaned:
        raise ValueError(f"project name {name!r} has no usable characters; use e.g. my_lora")
    return cleaned


def open_workspace(project: str, root: str | Path | None = None, use_drive: bool | None = None) -> Workspace:
    """Create (if needed) and return the project's workspace.

    ``root`` overrides where projects live (an empty string means the default, as a notebook form leaves it). In
    Colab (``use_drive`` defaults to it) Drive is mounted and projects live in ``MyDrive/lycolab``, so they survive
    the runtime; elsewhere in ``./workspace``.
    """
    use_drive = in_colab() if use_drive is None else use_drive
    if not root:
        if use_drive:
            _mount_drive()
            root = DRIVE_ROOT
        else:
            root = Path("workspace")
    workspace = Workspace(Path(root).expanduser().resolve() / project_name(project))
    for folder in SUBFOLDERS:
        (workspace.root / folder).mkdir(parents=True, exist_ok=True)
    return workspace


def secret(name: str) -> str | None:
    """A token from the environment, or from Colab's secrets panel (🔑) in Colab — never from a notebook form,
    whose values are saved in the notebook file."""
    import os

    if os.environ.get(name):
        return os.environ[name]
    if not in_colab():
        return None
    try:
        from google.colab import userdata

        return userdata.get(name)
    except Exception:  # not granted to this notebook, or not defined: downloads go without a token
        return None


def _mount_drive() -> None:
    if (DRIVE_MOUNT / "MyDrive").is_dir():
        return
    from google.colab import drive

    drive.mount(str(DRIVE_MOUNT))
