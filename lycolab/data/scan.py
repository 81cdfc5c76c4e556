"""Find images, their captions and their repeat counts on disk, the way sd-scripts and the old notebook do."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lycolab.config import SubsetConfig
from lycolab.data.images import UnreadableImage

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageRecord:
    """One training image as the data pipeline sees it, before bucketing."""

    path: Path
    caption: str
    num_repeats: int
    is_reg: bool
    subset: SubsetConfig
    has_caption: bool = True
    problem: UnreadableImage | None = None  # why the image cannot be used, found while scanning (its caption file)


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly inside ``directory`` (not recursive, as sd-scripts), sorted for reproducibility."""
    directory = Path(directory)
    return sorted(
        path for path in directory.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def parse_repeat_folder(name: str) -> tuple[int, str] | None:
    """``"10_sks dog"`` → ``(10, "sks dog")``; None when the name has no repeat prefix. Underscores after the first
    stay (``"10_my_char"`` → ``"my_char"``), as sd-scripts' ``extract_dreambooth_params`` keeps them."""
    match = _REPEAT_FOLDER.match(name)
    if not match:
        return None
    return int(match.group(1)), match.group(2)


def discover_subsets(root: str | Path, default_repeats: int | None = 1, class_tokens: str | None = None,
                     recursive: bool = True) -> list[SubsetConfig]:
    """One subset per folder holding images: the root itself and every subfolder, at any depth (the notebooks'
    convenience), or with ``recursive=False`` only the root's own subfolders, as sd-scripts scans
    ``train_data_dir``.

    A folder named ``N_name`` repeats N times with class tokens "name" (sd-scripts' DreamBooth convention). Other
    folders use ``default_repeats``; with ``default_repeats=None`` they are skipped with a warning, as sd-scripts
    does for ``train_data_dir`` without a dataset config.
    """
    root = Path(root)
    below = root.rglob("*") if recursive else root.iterdir()
    folders = [root] + sorted(path for path in below if path.is_dir())
    subsets = []
    for folder in folders:
        if not list_images(folder):
            continue
        parsed = parse_repeat_folder(folder.name) if folder != root else None
        if parsed:
            repeats, tokens = parsed
        elif default_repeats is None:
            logger.warning("%s: folder name is not N_name (e.g. 10_mychar), skipping it", folder)
            continue
        else:
            repeats, tokens = default_repeats, class_tokens
        subsets.append(SubsetConfig(image_dir=str(folder), num_repeats=repeats, class_tokens=tokens))
    return subsets


def caption_suffix(caption_extension: str) -> str:
    """``"txt"`` and ``".txt"`` both mean ``".txt"`` (sd-scripts accepts either)."""
    return caption_extension if caption_extension.startswith(".") else "." + caption_extension


def read_caption(image_path: Path, subset: SubsetConfig) -> str | None:
    """The first line of the caption file beside the image (``caption_extension``), or None when there is none;
    with ``enable_wildcard`` all its non-blank lines, stripped, joined by "\\n" (sd-scripts' ``read_caption``).

    Any bytes give a caption: a UTF-8 byte-order mark (Windows Notepad) is dropped, invalid UTF-8 becomes U+FFFD and
    NUL characters are removed. A caption file that cannot be read at all raises :class:`UnreadableImage` for the
    image, which is then skipped: training it without its caption would silently teach the wrong thing.
    """
    caption_path = image_path.with_suffix(caption_suffix(subset.caption_extension))
    if not caption_path.is_file():
        return None
    try:
        text = caption_path.read_text(encoding="utf-8-sig", errors="replace").replace("\0", "").strip()
    except OSError as error:
        raise UnreadableImage(f"{image_path}: its caption file {caption_path.name} cannot be read "
                              f"({error.strerror or error}); fix its permissions or delete it") from None
    if subset.enable_wildcard:  # read_text made every line end "\n"; process_caption picks one line each time
        return "\n".join(line.strip() for line in text.split("\n") if line.strip())
    return text.splitlines()[0].strip() if text else ""


def scan_subset(subset: SubsetConfig) -> list[ImageRecord]:
    """Records for a subset's images; a missing caption falls back to class_tokens (or empty)."""
    records = []
    for image_path in list_images(subset.image_dir):
        try:
            caption = read_caption(image_path, subset)
        except UnreadableImage as error:
            records.append(ImageRecord(image_path, "", subset.num_repeats, subset.is_reg, subset, False, error))
            continue
        has_caption = caption is not None
        records.append(ImageRecord(image_path, caption if has_caption else subset.class_tokens or "",
                                   subset.num_repeats, subset.is_reg, subset, has_caption))
    return records
