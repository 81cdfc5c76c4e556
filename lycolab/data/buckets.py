"""Aspect-ratio buckets with sd-scripts' rules, so the same images land in the same buckets as with kohya.

Images of one batch must share a size. sd-scripts predefines a list of (width, height) pairs with about the same area
as ``resolution`` and puts each image in the one with the closest aspect ratio (resize to cover, centre-crop). With
``bucket_no_upscale`` an image that is already small keeps its size (rounded down to ``bucket_reso_steps``) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lycolab.config import DatasetConfig


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
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
        width += divisible
    return sorted(resolutions)


class BucketManager:
    """Chooses a bucket per image; one instance per dataset since the settings are per dataset."""

    def __init__(self, dataset: DatasetConfig):
        self.reso_steps = dataset.bucket_reso_steps
        self.no_upscale = dataset.bucket_no_upscale
        self.enabled = dataset.enable_bucket
        self.resolution = dataset.resolution
        self.max_area = dataset.resolution[0] * dataset.resolution[1]
        if self.enabled and not self.no_upscale:
            self.predefined = make_bucket_resolutions(
                dataset.resolution, dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.bucket_reso_steps
            )
        else:
            self.predefined = []
        self.predefined_set = set(self.predefined)
        self.predefined_ratios = [width / height for width, height in self.predefined]

    def _round_to_steps(self, value: float) -> int:
        rounded = int(value + 0.5)
        return rounded - rounded % self.reso_steps

    def select(self, image_width: int, image_height: int) -> BucketChoice:
        """The bucket for an image of this size, by sd-scripts' ``BucketManager.select_bucket`` rules."""
        if not self.enabled:
            return self._fixed_resolution(image_width, image_height)
        aspect_ratio = image_width / image_height
        if not self.no_upscale:
            resolution = (image_width, image_height)
            if resolution not in self.predefined_set:
                errors = [abs(ratio - aspect_ratio) for ratio in self.predefined_ratios]
                resolution = self.predefined[errors.index(min(errors))]
            bucket_ratio = resolution[0] / resolution[1]
            scale = resolution[1] / image_height if aspect_ratio > bucket_ratio else resolution[0] / image_width
            resized = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            resized = self._no_upscale_size(image_width, image_height, aspect_ratio)
            resolution = (resized[0] - resized[0] % self.reso_steps, resized[1] - resized[1] % self.reso_steps)
        return BucketChoice(resolution, resized, resolution[0] / resolution[1] - aspect_ratio)

    def _no_upscale_size(self, image_width: int, image_height: int, aspect_ratio: float) -> tuple[int, int]:
        """Shrink images larger than the area budget, keeping the rounding with the smaller aspect error."""
        if image_width * image_height <= self.max_area:
            return (image_width, image_height)
        resized_width = math.sqrt(self.max_area * aspect_ratio)
        resized_height = self.max_area / resized_width
        width_rounded = self._round_to_steps(resized_width)
        height_for_width = self._round_to_steps(width_rounded / aspect_ratio)
        height_rounded = self._round_to_steps(resized_height)
        width_for_height = self._round_to_steps(height_rounded * aspect_ratio)
        width_first_error = abs(width_rounded / height_for_width - aspect_ratio)
        height_first_error = abs(width_for_height / height_rounded - aspect_ratio)
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
