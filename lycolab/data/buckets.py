"""Aspect-ratio buckets with sd-scripts' rules, so the same images land in the same buckets as with kohya.

Images of one batch must share a size. sd-scripts predefines a list of (width, height) pairs with about the same area
as ``resolution`` and puts each image in the one with the closest aspect ratio (resize to cover, centre-crop). With
``bucket_no_upscale`` an image that is already small keeps its size (rounded down to ``bucket_reso_steps``) instead.

Two kinds of image have no sensible bucket, and sd-scripts crashes on the first and exhausts memory on the second;
here they are skipped with a reason (:class:`NoBucketFits`), every other image gets exactly sd-scripts' bucket:

- with ``bucket_no_upscale``, an image narrower or shorter than one ``bucket_reso_steps`` step: its bucket would be
  0 pixels wide (sd-scripts divides by that zero);
- an image so long and thin that covering its bucket would mean cropping away most of it: when the resized image is
  more than :data:`MAX_CROP_FACTOR` times the bucket's area. A 1x4096 strip in a 256x1024 bucket would be resized to
  256x1048576 (gigabytes) to keep 0.1 % of it. This applies with and without bucketing (``enable_bucket = false``
  crops everything to ``resolution``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from lycolab.config import ConfigError, DatasetConfig

logger = logging.getLogger(__name__)

# An image is skipped when the crop to its bucket would keep less than 1/MAX_CROP_FACTOR of the resized image. With
# sd-scripts' default buckets (aspect ratios 1:4 to 4:1) that is an image more extreme than 1:32; with bucketing off
# (one square bucket), more extreme than 1:8. It also bounds the resize to 8 bucket areas of memory.
MAX_CROP_FACTOR = 8


class NoBucketFits(ValueError):
    """An image size no bucket can hold; the message says why and what to do, the caller adds the file name."""


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: the bucket (crop) size and the size it is resized to before cropping."""

    bucket_resolution: tuple[int, int]
    resized_size: tuple[int, int]
    aspect_ratio_error: float


def make_bucket_resolutions(
    max_resolution: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """All (width, height) pairs stepping by ``divisible`` whose area fits ``max_resolution``'s, sorted."""
    max_area = max_resolution[0] * max_resolution[1]
    resolutions = set()
    square = int(math.sqrt(max_area) // divisible) * divisible
    resolutions.add((square, square))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height < min_size:
            break  # height only shrinks as width grows: no later width adds a bucket (a huge max_size stays fast)
        resolutions.add((width, height))
        resolutions.add((height, width))
        width += divisible
    return sorted(resolutions)


def bucket_size_limits(dataset: DatasetConfig) -> tuple[int, int]:
    """``min_bucket_reso`` and ``max_bucket_reso`` as sd-scripts uses them, after checking every bucket setting.

    Like sd-scripts, a minimum that is not a multiple of ``bucket_reso_steps`` is rounded down to one and a maximum
    is rounded up (with a warning), and ``resolution`` must lie within the two. Settings that cannot work raise a
    :class:`ConfigError` naming the key: sd-scripts asserts the same, or would divide by zero on them.
    """
    where = _where(dataset)
    steps, low, high = dataset.bucket_reso_steps, dataset.min_bucket_reso, dataset.max_bucket_reso
    if steps < 1:
        raise ConfigError(f"{where}bucket_reso_steps must be a positive number of pixels (got {steps}); 64 is usual")
    if low > high:
        raise ConfigError(f"{where}min_bucket_reso ({low}) is larger than max_bucket_reso ({high}); swap or fix them")
    adjusted_low, adjusted_high = low - low % steps, high + (-high) % steps
    if adjusted_low < steps:
        raise ConfigError(f"{where}min_bucket_reso must be at least bucket_reso_steps ({steps}), got {low}; "
                          "256 is usual")
    if (adjusted_low, adjusted_high) != (low, high):
        logger.warning("%smin_bucket_reso/max_bucket_reso %d/%d are rounded to multiples of bucket_reso_steps (%d): "
                       "%d/%d", where, low, high, steps, adjusted_low, adjusted_high)
    width, height = dataset.resolution
    if min(width, height) < adjusted_low:
        raise ConfigError(f"{where}resolution {width}x{height} is below min_bucket_reso ({adjusted_low}); lower "
                          "min_bucket_reso or raise resolution")
    if max(width, height) > adjusted_high:
        raise ConfigError(f"{where}resolution {width}x{height} is above max_bucket_reso ({adjusted_high}); raise "
                          "max_bucket_reso or lower resolution")
    return adjusted_low, adjusted_high


def bucket_range_including(resolution: tuple[int, int], low: int, high: int, steps: int) -> tuple[int, int]:
    """(min_bucket_reso, max_bucket_reso) widened to hold ``resolution`` and rounded to whole steps, as sd-scripts
    requires: for forms and folders whose 256-1024 default range must not refuse the resolution the user chose."""
    low, high = min(low, *resolution), max(high, *resolution)
    return low - low % steps, high + (-high) % steps


def _where(dataset: DatasetConfig) -> str:
    """Which dataset a message is about (a config may hold several); BucketManager does not know the file."""
    return f"dataset with image_dir {dataset.subsets[0].image_dir}: " if dataset.subsets else ""


class BucketManager:
    """Chooses a bucket per image; one instance per dataset since the settings are per dataset.

    Building one checks the settings (:func:`bucket_size_limits`); with valid settings every predefined bucket is
    positive and a multiple of ``bucket_reso_steps`` (the square bucket is at least ``min_bucket_reso``), so the list
    is never empty.
    """

    def __init__(self, dataset: DatasetConfig):
        width, height = dataset.resolution
        if width < 1 or height < 1:
            raise ConfigError(f"{_where(dataset)}resolution must be positive (got {width}x{height}); 512 is usual")
        self.reso_steps = dataset.bucket_reso_steps
        self.no_upscale = dataset.bucket_no_upscale
        self.enabled = dataset.enable_bucket
        self.resolution = dataset.resolution
        self.max_area = width * height
        self.predefined: list[tuple[int, int]] = []
        if self.enabled:
            min_size, max_size = bucket_size_limits(dataset)
            if not self.no_upscale:
                self.predefined = make_bucket_resolutions(dataset.resolution, min_size, max_size, self.reso_steps)
        self.predefined_set = set(self.predefined)
        self.predefined_ratios = [bucket_width / bucket_height for bucket_width, bucket_height in self.predefined]

    def _round_to_steps(self, value: float) -> int:
        rounded = int(value + 0.5)
        return rounded - rounded % self.reso_steps

    def select(self, image_width: int, image_height: int) -> BucketChoice:
        """The bucket for an image of this size, by sd-scripts' ``BucketManager.select_bucket`` rules; raises
        :class:`NoBucketFits` for the images described in the module docstring."""
        if image_width < 1 or image_height < 1:
            raise NoBucketFits(f"image has no pixels ({image_width}x{image_height})")
        if not self.enabled:
            choice = self._fixed_resolution(image_width, image_height)
        elif self.no_upscale:
            choice = self._no_upscale_choice(image_width, image_height)
        else:
            choice = self._predefined_choice(image_width, image_height)
        self._check_crop(choice, image_width, image_height)
        return choice

    def _predefined_choice(self, image_width: int, image_height: int) -> BucketChoice:
        """The predefined bucket with the closest aspect ratio (the image's own size if it is one), covered."""
        aspect_ratio = image_width / image_height
        resolution = (image_width, image_height)
        if resolution not in self.predefined_set:
            errors = [abs(ratio - aspect_ratio) for ratio in self.predefined_ratios]
            resolution = self.predefined[errors.index(min(errors))]
        bucket_ratio = resolution[0] / resolution[1]
        scale = resolution[1] / image_height if aspect_ratio > bucket_ratio else resolution[0] / image_width
        resized = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        return BucketChoice(resolution, resized, bucket_ratio - aspect_ratio)

    def _no_upscale_choice(self, image_width: int, image_height: int) -> BucketChoice:
        """The image's own size (shrunk to the area budget if larger), rounded down to whole steps."""
        aspect_ratio = image_width / image_height
        resized = self._no_upscale_size(image_width, image_height, aspect_ratio)
        resolution = (resized[0] - resized[0] % self.reso_steps, resized[1] - resized[1] % self.reso_steps)
        if resolution[0] < 1 or resolution[1] < 1:
            kept = "" if resized == (image_width, image_height) else f" (shrunk to {resized[0]}x{resized[1]})"
            side = "width" if resolution[0] < 1 else "height"
            raise NoBucketFits(f"image is {image_width}x{image_height}{kept}: with bucket_no_upscale its {side} is "
                               f"below one bucket step ({self.reso_steps} px), so no bucket fits; use a larger image "
                               "or set bucket_no_upscale = false")
        return BucketChoice(resolution, resized, resolution[0] / resolution[1] - aspect_ratio)

    def _no_upscale_size(self, image_width: int, image_height: int, aspect_ratio: float) -> tuple[int, int]:
        """Shrink images larger than the area budget, keeping the rounding with the smaller aspect error (a rounding
        that reaches 0 px, where sd-scripts divides by zero, counts as infinitely wrong)."""
        if image_width * image_height <= self.max_area:
            return (image_width, image_height)
        resized_width = math.sqrt(self.max_area * aspect_ratio)
        resized_height = self.max_area / resized_width
        width_rounded = self._round_to_steps(resized_width)
        height_for_width = self._round_to_steps(width_rounded / aspect_ratio)
        height_rounded = self._round_to_steps(resized_height)
        width_for_height = self._round_to_steps(height_rounded * aspect_ratio)
        width_first_error = abs(width_rounded / height_for_width - aspect_ratio) if height_for_width else math.inf
        height_first_error = abs(width_for_height / height_rounded - aspect_ratio) if height_rounded else math.inf
        if width_first_error < height_first_error:
            return (width_rounded, int(width_rounded / aspect_ratio + 0.5))
        return (int(height_rounded * aspect_ratio + 0.5), height_rounded)

    def _fixed_resolution(self, image_width: int, image_height: int) -> BucketChoice:
        """Bucketing off: every image is resized to cover ``resolution`` and centre-cropped to it."""
        target_width, target_height = self.resolution
        scale = max(target_width / image_width, target_height / image_height)
        resized = (
            max(target_width, int(image_width * scale + 0.5)),
            max(target_height, int(image_height * scale + 0.5)),
        )
        return BucketChoice(self.resolution, resized, target_width / target_height - image_width / image_height)

    def _check_crop(self, choice: BucketChoice, image_width: int, image_height: int) -> None:
        """Refuse a choice whose crop keeps less than 1/MAX_CROP_FACTOR of the resized image (see the module)."""
        (bucket_width, bucket_height), (resized_width, resized_height) = choice.bucket_resolution, choice.resized_size
        if resized_width * resized_height <= MAX_CROP_FACTOR * bucket_width * bucket_height:
            return
        kept = 100 * bucket_width * bucket_height / (resized_width * resized_height)
        fix = ("lower min_bucket_reso or raise max_bucket_reso (more elongated buckets)" if self.enabled
               else "set enable_bucket = true")
        raise NoBucketFits(f"image is {image_width}x{image_height}, too long and thin for any bucket: its bucket "
                           f"{bucket_width}x{bucket_height} would keep only {kept:.2g}% of it (at least "
                           f"{100 / MAX_CROP_FACTOR:g}% is needed); cut the image into pieces or {fix}")
