"""Opening user images safely: orientation from EXIF, any mode to RGB, a bad file is reported, never fatal.

Phones, boorus and Drive give CMYK JPEGs, palette and transparent PNGs, 16-bit and float TIFF-like PNGs, animated
WebPs, truncated downloads, zero-byte placeholders, files whose extension lies about their format and files that
are not images at all. Each is either converted to upright 8-bit RGB or refused with an :class:`UnreadableImage`
naming the file and the reason (tests/test_fuzz_images.py tries them all).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)


# Larger images are refused: decoding one would take gigabytes (PIL's own limit warns at 89 M and refuses at 179 M).
MAX_IMAGE_PIXELS = 8192 * 8192


class UnreadableImage(Exception):
    """An image file that cannot be used; the message says which file and why."""


def open_rgb(path: str | Path) -> Image.Image:
    """The image upright (EXIF orientation applied) in 8-bit RGB; transparency is composited on white, animated
    images give their first frame."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as image:
            _check_size(path, image.size)
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb(image)
    except UnreadableImage:
        raise
    except MemoryError:
        raise UnreadableImage(f"{path}: not enough memory to decode it; downscale it first") from None
    except Exception as error:  # PIL's decoders raise many types on malformed data (OSError, ValueError,
        # SyntaxError, EOFError, struct.error, IndexError, …): each is this one file's problem, never the run's
        raise UnreadableImage(f"{path}: cannot read image ({_reason(error)})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: high-bit-depth and float images are scaled, not clipped to white."""
    if image.mode in ("La", "RGBa"):  # premultiplied alpha, which PIL converts to RGB only via LA/RGBA
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        with np.errstate(invalid="ignore"):  # float images may hold NaN/inf: black and white, without a warning
            array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        if image.mode != "F":
            array = array / (65535.0 if array.max(initial=0) > 255 else 255.0)
        gray = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def verified_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after decoding every pixel once: a truncated file fails here, not in the middle of training."""
    return open_rgb(path).size


def _check_file(path: Path) -> None:
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage(f"{path}: empty file (0 bytes); re-download or delete it")
    except OSError as error:
        raise UnreadableImage(f"{path}: cannot read file ({error.strerror})") from None


def _check_size(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise UnreadableImage(f"{path}: image is {width}x{height}, larger than {MAX_IMAGE_PIXELS // 1_000_000} "
                              "megapixels; downscale it first")
    if width < 1 or height < 1:
        raise UnreadableImage(f"{path}: image has no pixels ({width}x{height})")


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image file, or a format PIL cannot decode"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "truncated" in text.lower():
        return f"truncated file ({text}); re-download it"
    return text


def resize_and_crop(image: Image.Image, resized_size: tuple[int, int], crop_size: tuple[int, int],
                    rng: random.Random | None = None) -> np.ndarray:
    """Resize (Lanczos when shrinking) then crop to the bucket — centred, or at a random place when ``rng`` is
    given (random_crop); returns HxWx3 uint8."""
    if image.size != resized_size:
        shrinking = resized_size[0] < image.size[0]
        image = image.resize(resized_size, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC)
    spare_x, spare_y = resized_size[0] - crop_size[0], resized_size[1] - crop_size[1]
    left = rng.randint(0, spare_x) if rng else spare_x // 2
    top = rng.randint(0, spare_y) if rng else spare_y // 2
    image = image.crop((left, top, left + crop_size[0], top + crop_size[1]))
    return np.array(image, dtype=np.uint8)  # a writable copy, as torch.from_numpy needs
