"""What the tagger and the captioner share: the write modes, which images need a new caption, and batches of
opened images with unreadable files skipped and reported."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lycolab.annotate.manifest import CaptionManifest
from lycolab.data.images import UnreadableImage, open_rgb
from lycolab.data.scan import caption_suffix, list_images

logger = logging.getLogger(__name__)

# What happens to an existing caption: skip keeps every one; overwrite replaces those lycolab wrote and nobody
# changed since (the user's edits and hand-made captions are kept); overwrite_all replaces every one; append adds
# the new tags missing from it.
WRITE_MODES = ("skip", "overwrite", "overwrite_all", "append")


@dataclass
class AnnotationResult:
    written: list[Path] = field(default_factory=list)  # captions (re)written by the model
    kept_existing: list[Path] = field(default_factory=list)  # skip: existing captions left as they were
    kept_edited: list[Path] = field(default_factory=list)  # overwrite: the user's captions, kept
    cleaned: list[Path] = field(default_factory=list)  # kept captions the undesired tags / trigger word changed
    bad_files: list[str] = field(default_factory=list)


def check_mode(mode: str) -> str:
    if mode not in WRITE_MODES:
        raise ValueError(f"mode must be one of {', '.join(WRITE_MODES)}, got {mode!r}")
    return mode


def images_to_annotate(folder: str | Path, caption_extension: str, mode: str, result: AnnotationResult,
                       manifest: CaptionManifest) -> list[Path]:
    """The folder's images whose caption the model should write in this ``mode``; the others are recorded in
    ``result`` as kept (skip) or kept as the user's (overwrite)."""
    pending = []
    for image_path in list_images(folder):
        caption = image_path.with_suffix(caption_suffix(caption_extension))
        if not caption.exists() or mode in ("overwrite_all", "append"):
            pending.append(image_path)
        elif mode == "skip":
            result.kept_existing.append(caption)
        elif manifest.written_by_lycolab(caption):
            pending.append(image_path)
        else:
            result.kept_edited.append(caption)
    return pending


def report_kept(result: AnnotationResult) -> None:
    if result.kept_existing:
        logger.info("%d image(s) already had captions and were kept; use overwrite or append mode to change them",
                    len(result.kept_existing))
    if result.kept_edited:
        logger.info("%d edited caption(s) kept (changed since lycolab wrote them, or written by hand); use "
                    "overwrite_all to replace them too", len(result.kept_edited))


def image_batches(paths: list[Path], batch_size: int, result: AnnotationResult
                  ) -> Iterator[tuple[list[Path], list[Image.Image]]]:
    """(paths, RGB images) per batch; an unreadable file is warned about once, recorded and left out."""
    for start in range(0, len(paths), batch_size):
        opened, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(open_rgb(path))
                opened.append(path)
            except UnreadableImage as error:
                logger.warning("skipping %s", error)
                result.bad_files.append(str(error))
        yield opened, images
