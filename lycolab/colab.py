"""The workspace every notebook opens first: on Google Drive in Colab, ``./workspace/<project>`` elsewhere.

Each step notebook starts with ``ws = open_workspace(project)`` and reads what earlier steps left on disk, so any
single step can be re-run after a runtime restart. An empty project name means the last one opened under the same
root, so a step notebook opened alone finds the user's project. Base models live in one folder shared by every
project (``<root>/_models``): a 2–7 GB checkpoint is downloaded once, not once per project. ``google.colab`` is
imported only inside Colab.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lycolab.files import atomic_write

logger = logging.getLogger(__name__)

# Where Colab mounts Drive; LYCOLAB_DRIVE_MOUNT moves it (a Drive mounted elsewhere, or the tests' fake Colab).
DRIVE_MOUNT = Path(os.environ.get("LYCOLAB_DRIVE_MOUNT", "/content/drive"))
DRIVE_ROOT = DRIVE_MOUNT / "MyDrive" / "lycolab"
SUBFOLDERS = ("config", "train_data", "reg_data", "models", "output", "output/sample", "logs", "state")
DEFAULT_PROJECT = "my_lora"
LAST_PROJECT_FILE = ".last_project"  # in the projects' root; project names never start with "." or "_"
SHARED_MODELS = "_models"


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
    def shared_models(self) -> Path:
        """Base models and VAEs, shared by every project under the same root (one download each)."""
        return self.root.parent / SHARED_MODELS

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
    """Colab's own ``google.colab`` package is importable (found, not imported: that is slow and mounts nothing) in
    a runtime with Colab's ``/content`` (or a Drive mount point set by LYCOLAB_DRIVE_MOUNT): a local Jupyter that
    happens to have the google-colab package installed is not Colab."""
    if "google.colab" in sys.modules:
        return True
    try:
        found = importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False
    return found and (Path("/content").is_dir() or "LYCOLAB_DRIVE_MOUNT" in os.environ)


def project_name(name: str) -> str:
    """A folder-safe project name (letters, digits, ``-``, ``_``, ``.``); refuses names that would escape."""
    cleaned = re.sub(r"[^\w.-]+", "_", name.strip()).strip("._")
    if not cleaned:
        raise ValueError(f"project name {name!r} has no usable characters; use e.g. my_lora")
    return cleaned


def open_workspace(project: str = "", root: str | Path | None = None, use_drive: bool | None = None,
                   show_logs: bool = True) -> Workspace:
    """Create (if needed) and return the project's workspace, and show lycolab's log lines in the notebook.

    ``root`` overrides where projects live (an empty string means the default, as a notebook form leaves it). In
    Colab (``use_drive`` defaults to it) Drive is mounted and projects live in ``MyDrive/lycolab``, so they survive
    the runtime; elsewhere in ``./workspace``. An empty ``project`` is the last one opened under that root (the first
    time: ``my_lora``).
    """
    use_drive = in_colab() if use_drive is None else use_drive
    if not root:
        if use_drive:
            _mount_drive()
            root = DRIVE_ROOT
        else:
            root = Path("workspace")
    projects = Path(root).expanduser().resolve()
    name = project_name(project) if str(project).strip() else last_project(projects)
    workspace = Workspace(projects / name)
    for folder in SUBFOLDERS:
        (workspace.root / folder).mkdir(parents=True, exist_ok=True)
    if name != last_project(projects):
        atomic_write(projects / LAST_PROJECT_FILE, lambda temporary: temporary.write_text(name, encoding="utf-8"))
    if show_logs:
        from lycolab.log_display import show_logs_here

        show_logs_here()
    logger.info("project %s: %s", name, workspace.root)
    return workspace


def last_project(projects_root: str | Path) -> str:
    """The project last opened under ``projects_root``, or ``my_lora`` when none was."""
    try:
        return project_name(Path(projects_root, LAST_PROJECT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return DEFAULT_PROJECT


def secret(name: str) -> str | None:
    """A token from the environment, or from Colab's secrets panel (🔑) in Colab — never from a notebook form,
    whose values are saved in the notebook file."""
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


def on_drive(path: str | Path) -> bool:
    """Whether ``path`` is on the mounted Google Drive (so it outlives the runtime already)."""
    return Path(path).resolve().is_relative_to(DRIVE_MOUNT.resolve())
