"""Opening user images safely: orientation from EXIF, any mode to RGB, a bad file is reported, never fatal."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)


# What PIL raises for truncated, non-image, corrupt or decompression-bomb files.
_READ_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


class UnreadableImage(Exception):
    """An image file that cannot be used; the message says which file and why."""


def open_rgb(path: str | Path) -> Image.Image:
    """The image upright (EXIF orientation applied) in RGB; transparency is composited on white."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            image.load()
    except _READ_ERRORS as error:
        raise UnreadableImage(f"{path}: cannot read image ({error})") from None
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header without decoding pixels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except _READ_ERRORS as error:
        raise UnreadableImage(f"{path}: cannot read image ({error})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def resize_and_crop(image: Image.Image, resized_size: tuple[int, int], crop_size: tuple[int, int]) -> np.ndarray:
    """Resize (Lanczos when shrinking) then centre-crop to the bucket; returns HxWx3 uint8."""
    if image.size != resized_size:
        shrinking = resized_size[0] < image.size[0]
        image = image.resize(resized_size, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC)
    left = (resized_size[0] - crop_size[0]) // 2
    top = (resized_size[1] - crop_size[1]) // 2
    image = image.crop((left, top, left + crop_size[0], top + crop_size[1]))
    return np.array(image, dtype=np.uint8)  # a writable copy, as torch.from_numpy needs
