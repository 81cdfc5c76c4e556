"""Near-duplicate images moved aside, never deleted: the dataset doctor finds them, this takes them out of training.

Each group the doctor's finder gives (:func:`lycolab.data.report.find_near_duplicates`, 64-bit difference hashes a
few bits apart) keeps one image — the one with the most pixels (a resized copy is the one to lose), then the larger
file (less compressed), then the first by path — and moves the others, with their caption and cache files, to a
destination folder under the same relative subfolders (``10_mychar/a.png`` → ``duplicates/10_mychar/a.png``), so
putting one back is a move in the other direction. Nothing there is ever overwritten: a taken name gets `` (1)``,
`` (2)`` … before its suffix, the same for the image and its companions.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from PIL import Image

from lycolab.data.report import DUPLICATE_DISTANCE, KNOWN_COMPANIONS, find_near_duplicates
from lycolab.data.scan import IMAGE_EXTENSIONS, list_images

logger = logging.getLogger(__name__)


def move_duplicates(folder: str | Path, destination: str | Path, distance: int = DUPLICATE_DISTANCE,
                    caption_extensions: tuple[str, ...] = ()) -> list[Path]:
    """Move all but the best image of each near-duplicate group under ``folder`` (subfolders included) to
    ``destination``; returns where the moved images are now (their companions moved with them).

    Companions are the files beside an image with its name and a suffix from
    :data:`lycolab.data.report.KNOWN_COMPANIONS` (``.txt``, ``.caption``, ``.npz`` …) or ``caption_extensions``.
    One that another image still in the folder shares (``a.png`` and ``a.jpg`` both read ``a.txt``) is copied,
    not moved. ``destination`` must lie outside ``folder``: inside it the duplicates would be trained on.
    """
    folder, destination = Path(folder).resolve(), Path(destination).resolve()
    if destination == folder or folder in destination.parents:
        raise ValueError(f"{destination}: inside {folder}, where the moved images would still be trained on; "
                         "choose a folder outside it (e.g. the workspace's duplicates/)")
    images = [image for directory in (folder, *sorted(p for p in folder.rglob("*") if p.is_dir()))
              for image in list_images(directory)]
    moved = []
    for group in find_near_duplicates(images, distance):
        keep, *others = sorted(group, key=lambda path: (-_pixels(path), -path.stat().st_size, str(path)))
        moved += [_move_with_companions(image, folder, destination, caption_extensions) for image in others]
        logger.info("kept %s; moved %d near-duplicate(s) of it", keep.relative_to(folder), len(group) - 1)
    return moved


def _pixels(path: Path) -> int:
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # the finder read it a moment ago; if it cannot be opened now, it is not the one to keep
        return 0
    return width * height


def _companions(image: Path, caption_extensions: tuple[str, ...]) -> list[Path]:
    suffixes = {suffix.lower() for suffix in KNOWN_COMPANIONS}
    suffixes |= {extension.lower() if extension.startswith(".") else f".{extension.lower()}"
                 for extension in caption_extensions}
    return sorted(path for path in image.parent.iterdir()
                  if path.is_file() and path.stem == image.stem and path.suffix.lower() in suffixes)


def _move_with_companions(image: Path, folder: Path, destination: Path, caption_extensions: tuple[str, ...]
                          ) -> Path:
    target_dir = destination / image.parent.relative_to(folder)
    target_dir.mkdir(parents=True, exist_ok=True)
    companions = _companions(image, caption_extensions)
    stem = _free_stem(target_dir, image.stem, [image.suffix] + [path.suffix for path in companions])
    shared = any(other != image and other.stem == image.stem and other.suffix.lower() in IMAGE_EXTENSIONS
                 for other in image.parent.iterdir() if other.is_file())
    for companion in companions:
        (shutil.copy2 if shared else shutil.move)(str(companion), str(target_dir / f"{stem}{companion.suffix}"))
    target = target_dir / f"{stem}{image.suffix}"
    shutil.move(str(image), str(target))
    return target


def _free_stem(directory: Path, stem: str, suffixes: list[str]) -> str:
    """``stem``, or ``stem (1)``, ``stem (2)`` … — the first for which none of the files exists yet."""
    candidate, number = stem, 0
    while any((directory / f"{candidate}{suffix}").exists() for suffix in suffixes):
        number += 1
        candidate = f"{stem} ({number})"
    return candidate
