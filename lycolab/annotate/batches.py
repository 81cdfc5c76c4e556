"""What the tagger and the captioner share: which images still need a caption, and batches of opened images with
unreadable files skipped and reported."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lycolab.data.images import UnreadableImage, open_rgb
from lycolab.data.scan import caption_suffix, list_images

logger = logging.getLogger(__name__)


@dataclass
class AnnotationResult:
    written: list[Path] = field(default_factory=list)
    kept_existing: list[Path] = field(default_factory=list)
    bad_files: list[str] = field(default_factory=list)


def images_to_annotate(folder: str | Path, caption_extension: str, keep_existing: bool, result: AnnotationResult
                       ) -> list[Path]:
    """The folder's images, minus those whose caption file exists when ``keep_existing`` (recorded as kept)."""
    pending = []
    for image_path in list_images(folder):
        caption = image_path.with_suffix(caption_suffix(caption_extension))
        if keep_existing and caption.exists():
            result.kept_existing.append(caption)
        else:
            pending.append(image_path)
    return pending


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
