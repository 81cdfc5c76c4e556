"""Step 03: put training images into ``train_data/`` — upload a zip, a zip on Drive or at a URL (a Google Drive
share link works), a folder, a list of image URLs, a hub dataset, or a tag search on an image board — then show the
dataset doctor's report.

Only images and their caption files are taken; zip entries that would land outside the folder are refused.
Subfolders are kept, so ``10_mychar``-style repeat folders work as in sd-scripts.
"""

from __future__ import annotations

import logging
import shutil
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lycolab.colab import Workspace
from lycolab.data.scan import IMAGE_EXTENSIONS
from lycolab.display import ShownAsTable, Table, one_line_errors
from lycolab.files import atomic_write

logger = logging.getLogger(__name__)

SOURCES = ("upload", "zip", "folder", "urls", "hub", "booru")
KEPT_EXTENSIONS = IMAGE_EXTENSIONS + (".txt", ".caption")


@dataclass
class DataResult(ShownAsTable):
    folder: Path
    added: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def table(self) -> Table:
        images = [path for path in self.added if path.suffix.lower() in IMAGE_EXTENSIONS]
        notes = [f"skipped: {item}" for item in self.skipped[:20]]
        return Table([{"folder": str(self.folder), "images added": len(images),
                       "caption files added": len(self.added) - len(images)}], title="training data", notes=notes)


def _kept(name: str) -> bool:
    path = PurePosixPath(name)
    return path.suffix.lower() in KEPT_EXTENSIONS and "__MACOSX" not in path.parts and not path.name.startswith(".")


def extract_zip(archive: Path, destination: Path, result: DataResult) -> None:
    """Images and captions from a zip; entries with absolute paths or ``..`` are refused, not written."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            for entry in bundle.infolist():
                path = PurePosixPath(entry.filename)
                if entry.is_dir() or not _kept(entry.filename):
                    continue
                if path.is_absolute() or ".." in path.parts:
                    result.skipped.append(f"{entry.filename} (path leaves the folder)")
                    continue
                target = destination.joinpath(*path.parts)
                data = bundle.read(entry)
                result.added.append(atomic_write(target, lambda temporary, data=data: temporary.write_bytes(data)))
    except zipfile.BadZipFile:
        raise ValueError(f"{archive}: not a zip file (or a damaged one); re-create it") from None


def copy_folder(source: Path, destination: Path, result: DataResult) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file() and _kept(str(path.relative_to(source))):
            target = destination / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            result.added.append(Path(shutil.copy2(path, target)))


def download_urls(listing: str, destination: Path, result: DataResult) -> None:
    """One image per URL; ``listing`` is a text file with one URL per line, or the URLs themselves."""
    path = Path(listing.strip()).expanduser()
    text = path.read_text(encoding="utf-8") if "\n" not in listing and path.is_file() else listing
    urls = [line.strip() for line in text.split() if line.strip().startswith(("http://", "https://"))]
    if not urls:
        raise ValueError("no http(s) image URLs given; put one URL per line")
    for index, url in enumerate(urls):
        name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or f"image_{index:04d}.jpg"
        if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            name = f"{Path(name).stem or 'image'}_{index:04d}.jpg"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as error:
            result.skipped.append(f"{url.split('?')[0]} ({getattr(error, 'reason', error)})")
            continue
        result.added.append(atomic_write(destination / name, lambda temporary, data=data: temporary.write_bytes(data)))


def hub_dataset(repo: str, destination: Path, result: DataResult, token: str | None) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [f"*{extension}" for extension in KEPT_EXTENSIONS]
    try:
        folder = snapshot_download(repo, repo_type="dataset", allow_patterns=patterns, token=token or None)
    except LocalEntryNotFoundError:
        raise ValueError(f"{repo}: the hub cannot be reached; upload the images as a zip instead") from None
    except HfHubHTTPError as error:
        raise ValueError(f"{repo}: {error.response.status_code if error.response is not None else ''} from the hub; "
                         "check the dataset name (and add HF_TOKEN to Colab's Secrets 🔑 for a private one)") from None
    copy_folder(Path(folder), destination, result)


def _download_zip(url: str, workspace: Workspace) -> Path:
    """A zip at a URL (or a Drive share link) into the workspace's ``downloads/``, resumable like model downloads;
    named after the URL, so a second run finds it and another URL never reuses it."""
    import hashlib

    from lycolab.models.download import download_url

    name = f"images-{hashlib.sha256(url.encode()).hexdigest()[:12]}.zip"
    return download_url(url, workspace.root / "downloads", filename=name)


def _upload(destination: Path, result: DataResult) -> None:
    from google.colab import files  # only offered in Colab

    for name, data in files.upload().items():
        saved = atomic_write(destination / Path(name).name, lambda temporary, data=data: temporary.write_bytes(data))
        if saved.suffix.lower() == ".zip":
            extract_zip(saved, destination, result)
            saved.unlink()
        elif _kept(saved.name):
            result.added.append(saved)


@one_line_errors
def get_data(workspace: Workspace, source: str = "zip", location: str = "", subfolder: str = "",
             hf_token: str = "", limit: int = 100, booru_site: str = "danbooru", ratings: str = "",
             min_score: int = 0):
    """Bring images (and captions) into ``train_data/<subfolder>``; existing files with the same name are replaced.

    For ``booru`` the location is the tag search (``1girl solo``): up to ``limit`` images of ``booru_site``
    (danbooru, gelbooru, safebooru), each with its tags as the caption; a second run adds only what is missing.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)} (got {source!r})")
    destination = workspace.train_data / subfolder.strip().strip("/") if subfolder.strip() else workspace.train_data
    destination.mkdir(parents=True, exist_ok=True)
    if source == "booru":
        from lycolab.data.booru import download_booru

        return download_booru(location, destination, limit, booru_site, ratings=ratings,
                              min_score=min_score if min_score > 0 else None,
                              caption_extension=workspace.recall("caption_extension", ".txt"))
    result = DataResult(destination)
    if source == "upload":
        _upload(destination, result)
    elif source == "urls":
        download_urls(location, destination, result)
    elif source == "hub":
        from lycolab.colab import secret

        hub_dataset(location.strip(), destination, result, hf_token or secret("HF_TOKEN"))
    else:
        path = Path(location.strip()).expanduser()
        if source == "zip" and location.strip().startswith(("http://", "https://")):
            path = _download_zip(location.strip(), workspace)
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found; give the {source} path (e.g. on /content/drive/MyDrive)")
        if source == "zip":
            extract_zip(path, destination, result)
        else:
            copy_folder(path, destination, result)
    logger.info("%d file(s) added to %s", len(result.added), destination)
    return result


@one_line_errors
def dataset_report(workspace: Workspace, resolution: int = 512, caption_extension: str = "", batch_size: int = 1):
    """The dataset doctor on ``train_data/`` (the same report as ``lycolab check-dataset``)."""
    from lycolab.data.report import check_dataset, folder_datasets

    extension = caption_extension or workspace.recall("caption_extension", ".txt")
    return check_dataset(folder_datasets(workspace.train_data, str(resolution), extension), batch_size)


@one_line_errors
def move_duplicates_aside(workspace: Workspace, move: bool = False) -> Table:
    """Near-duplicate images of ``train_data/`` (the doctor's finder): listed, and with ``move`` moved with their
    captions to the workspace's ``duplicates/`` folder (same subfolders), never deleted — move one back to keep it."""
    from lycolab.data.dedupe import move_duplicates
    from lycolab.data.report import find_near_duplicates
    from lycolab.data.scan import list_images

    destination = workspace.root / "duplicates"
    if move:
        moved = move_duplicates(workspace.train_data, destination,
                                caption_extensions=(workspace.recall("caption_extension", ".txt"),))
        rows = [{"moved": str(path.relative_to(destination))} for path in moved]
        return Table(rows, title=f"{len(moved)} duplicate(s) moved to {destination}",
                     notes=[] if moved else ["no near-duplicates found"])
    folders = [workspace.train_data, *sorted(p for p in workspace.train_data.rglob("*") if p.is_dir())]
    groups = find_near_duplicates([image for folder in folders for image in list_images(folder)])
    rows = [{"group": index + 1, "images": ", ".join(str(path.relative_to(workspace.train_data)) for path in group)}
            for index, group in enumerate(groups)]
    notes = ["tick move_duplicates to keep the best of each group and move the others to duplicates/"] if groups \
        else ["no near-duplicates found"]
    return Table(rows, title=f"{len(groups)} group(s) of near-duplicates", notes=notes)
