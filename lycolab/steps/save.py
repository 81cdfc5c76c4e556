"""Step 07: keep the results — output/ (adapters, samples, states), config/, logs/ and optionally train_data/ —
on Google Drive, as zips (one file each, quick to download) or as plain folder copies.

Zips are written beside their final name and renamed into place, so an interrupted copy never leaves a
half-written archive that looks complete. In Colab the workspace itself lives on Drive: a folder already there is
not stored a second time (a 15 GB Drive fills fast); this step then only lists where things are. A workspace kept
on the runtime's disk (``workspace_root`` outside Drive) is copied as before.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lycolab.colab import DRIVE_MOUNT, Workspace, in_colab, on_drive
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
        if on_drive(folder) and on_drive(target):
            rows.append({"saved": f"{folder} (already on Drive: not copied again)", "size": _size(folder)})
            continue
        if as_zip:
            saved = atomic_write(target / f"{folder.name}-{stamp}.zip",
                                 lambda temporary, folder=folder: _zip(folder, temporary))
        else:
            saved = Path(shutil.copytree(folder, target / folder.name, dirs_exist_ok=True))
        rows.append({"saved": str(saved), "size": _size(saved)})
    return Table(rows, title=f"saved to {target}")


def _size(path: Path) -> str:
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{size / 2**20:.1f} MiB"


def _zip(folder: Path, temporary: Path) -> None:
    archive = shutil.make_archive(str(temporary.with_suffix("")), "zip", root_dir=folder.parent, base_dir=folder.name)
    Path(archive).replace(temporary)


def _newest_round(samples: Path) -> list[Path]:
    """The images of the newest sample round (its grid's siblings), the most telling for a model card."""
    grids = sorted(samples.glob("*_grid.png"), key=lambda path: path.stat().st_mtime)
    if not grids:
        return []
    stem = grids[-1].name.removesuffix("_grid.png")
    return sorted(path for path in samples.glob(f"{stem}_[0-9][0-9].png"))


@one_line_errors
def publish_to_hub(workspace: Workspace, repo_id: str = "", private: bool = True, adapter: str = "",
                   endpoint: str | None = None) -> Table:
    """Upload the final adapter (or ``adapter``), the newest round of samples and a generated model card to the
    Hugging Face Hub repo ``repo_id``; an empty ``repo_id`` uploads nothing. The token is ``HF_TOKEN`` from Colab's
    Secrets panel (🔑) or the environment, never a form field."""
    from lycolab.config import load_config
    from lycolab.publish import model_card, upload_to_hub

    if not repo_id.strip():
        return Table([], title="not uploaded", notes=["give hub_repo (e.g. your-name/my-lora) to publish on the Hub"])
    if adapter.strip():
        chosen = Path(adapter.strip()).expanduser()
    else:
        name = load_config(workspace.config_file).output_name if workspace.config_file.is_file() else workspace.name
        chosen = workspace.output / f"{name or workspace.name}.safetensors"
    if not chosen.is_file():
        raise FileNotFoundError(f"{chosen}: no adapter there; train in step 06 first, or give adapter")
    samples = _newest_round(workspace.samples)
    trigger = workspace.recall("trigger_word", "")
    card = model_card(chosen, samples, [trigger] if trigger else [], base_model=workspace.recall("model", ""),
                      repo_id=repo_id.strip())
    url = upload_to_hub(repo_id.strip(), chosen, samples, card=card, private=private, endpoint=endpoint)
    return Table([{"uploaded": chosen.name, "samples": len(samples), "repo": url}], title="published on the Hub",
                 notes=["private: only you can see it" if private else "public"])
