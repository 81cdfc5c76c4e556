"""Step 07: keep the results — output/ (adapters, samples, states), config/, logs/ and optionally train_data/ —
on Google Drive, as zips (one file each, quick to download) or as plain folder copies.

Zips are written beside their final name and renamed into place, so an interrupted copy never leaves a
half-written archive that looks complete.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lycolab.colab import DRIVE_MOUNT, Workspace, in_colab
from lycolab.display import Table, one_line_errors
from lycolab.files import atomic_write


def default_destination(workspace: Workspace) -> Path:
    """Drive's ``MyDrive/lycolab_backups/<project>`` in Colab; ``<workspace>/../backups/<project>`` elsewhere."""
    if in_colab():
        return DRIVE_MOUNT / "MyDrive" / "lycolab_backups" / workspace.name
    return workspace.root.parent / "backups" / workspace.name


@one_line_errors
def save_to_drive(workspace: Workspace, destination: str = "", include_train_data: bool = False,
                  as_zip: bool = True) -> Table:
    """Copy or zip the workspace folders to ``destination`` (default: :func:`default_destination`)."""
    target = Path(destination).expanduser() if destination.strip() else default_destination(workspace)
    target.mkdir(parents=True, exist_ok=True)
    folders = [workspace.output, workspace.config, workspace.logs] + ([workspace.train_data] if include_train_data
                                                                      else [])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for folder in folders:
        if not folder.is_dir():
            continue
        if as_zip:
            saved = atomic_write(target / f"{folder.name}-{stamp}.zip",
                                 lambda temporary, folder=folder: _zip(folder, temporary))
        else:
            saved = Path(shutil.copytree(folder, target / folder.name, dirs_exist_ok=True))
        size = saved.stat().st_size if saved.is_file() else sum(p.stat().st_size for p in saved.rglob("*")
                                                                 if p.is_file())
        rows.append({"saved": str(saved), "size": f"{size / 2**20:.1f} MiB"})
    return Table(rows, title=f"saved to {target}")


def _zip(folder: Path, temporary: Path) -> None:
    archive = shutil.make_archive(str(temporary.with_suffix("")), "zip", root_dir=folder.parent, base_dir=folder.name)
    Path(archive).replace(temporary)
