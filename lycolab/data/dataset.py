"""The training set: every usable image with its bucket, and per-epoch batches drawn one bucket at a time."""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lycolab.config import DatasetConfig
from lycolab.data.buckets import BucketChoice, BucketManager, NoBucketFits
from lycolab.data.captions import process_caption
from lycolab.data.images import UnreadableImage, open_rgb, resize_and_crop, verified_size
from lycolab.data.scan import ImageRecord, scan_subset

logger = logging.getLogger(__name__)


@dataclass
class TrainItem:
    """One usable image, its bucket and which dataset (hence batch size) it belongs to."""

    record: ImageRecord
    bucket: BucketChoice
    dataset_index: int
    original_size: tuple[int, int] = (0, 0)  # (width, height) of the file, for SDXL's size conditioning


class BucketedDataset:
    """Images grouped by bucket; batches never mix bucket sizes, as the U-Net needs one size per batch."""

    def __init__(self, datasets: list[DatasetConfig], default_batch_size: int, seed: int = 0):
        self.datasets = datasets
        self.batch_sizes = [dataset.batch_size or default_batch_size for dataset in datasets]
        self.seed = seed
        self.items: list[TrainItem] = []
        self.skipped: list[str] = []
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # decoding releases the GIL
            for dataset_index, dataset in enumerate(datasets):
                manager = BucketManager(dataset)
                for subset in dataset.subsets:
                    records = scan_subset(subset)
                    items = [self._usable(record, size, manager, dataset_index)
                             for record, size in zip(records, pool.map(_size_or_error, records), strict=True)]
                    items = [item for item in items if item is not None]
                    _warn_missing_captions(subset, items)
                    self.items += items
        self.items = [item for index in range(len(datasets)) for item in
                      balance_regularization([item for item in self.items if item.dataset_index == index])]

    def _usable(self, record: ImageRecord, size: tuple[int, int] | UnreadableImage, manager: BucketManager,
                dataset_index: int) -> TrainItem | None:
        """The record with its bucket, or None (and one warning naming the file and reason) if it cannot be used:
        unreadable image or caption file, or a size no bucket fits (see :mod:`lycolab.data.buckets`)."""
        if isinstance(size, UnreadableImage):
            return self._skip(size)
        try:
            return TrainItem(record, manager.select(*size), dataset_index, tuple(size))
        except NoBucketFits as error:
            return self._skip(UnreadableImage(f"{record.path}: {error}"))

    def _skip(self, reason: UnreadableImage) -> None:
        logger.warning("skipping %s", reason)
        self.skipped.append(str(reason))

    def __len__(self) -> int:
        return len(self.items)

    def bucket_counts(self) -> dict[tuple[int, tuple[int, int]], int]:
        """Images per (dataset, bucket resolution), repeats included, in sorted order."""
        counts: Counter = Counter()
        for item in self.items:
            counts[(item.dataset_index, item.bucket.bucket_resolution)] += item.record.num_repeats
        return dict(sorted(counts.items()))

    def num_images_with_repeats(self) -> int:
        return sum(item.record.num_repeats for item in self.items)

    def batches_per_epoch(self, processes: int = 1) -> int:
        """Batches in one epoch: each bucket's images (with repeats) split into batch-size chunks (the batch size
        times the number of training processes, which share each batch)."""
        return sum(
            math.ceil(count / (self.batch_sizes[dataset_index] * processes))
            for (dataset_index, _), count in self.bucket_counts().items()
        )

    def make_batches(self, epoch: int, processes: int = 1) -> list[list[int]]:
        """Item indices per global batch for this epoch: shuffled within each bucket, then batch order shuffled.
        With several training processes a global batch holds ``processes`` times the batch size."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        by_bucket: dict[tuple[int, tuple[int, int]], list[int]] = {}
        for index, item in enumerate(self.items):
            key = (item.dataset_index, item.bucket.bucket_resolution)
            by_bucket.setdefault(key, []).extend([index] * item.record.num_repeats)
        batches = []
        for (dataset_index, _), indices in sorted(by_bucket.items()):
            rng.shuffle(indices)
            size = self.batch_sizes[dataset_index] * processes
            batches += [indices[start : start + size] for start in range(0, len(indices), size)]
        rng.shuffle(batches)
        return batches

    def caption(self, index: int, rng: random.Random, epoch: int, step: int = 0, max_train_steps: int = 0) -> str:
        """The item's caption at ``epoch`` after ``step`` optimizer steps (sd-scripts' current epoch and step, which
        caption dropout every N epochs and token warmup read); ``max_train_steps`` for a fractional warmup."""
        item = self.items[index]
        return process_caption(item.record.caption, item.record.subset, rng, epoch, step, max_train_steps)

    def pixels(self, index: int, flip: bool = False, rng: random.Random | None = None) -> torch.Tensor:
        """The image resized and cropped to its bucket, as a 3xHxW float tensor in [-1, 1]; mirrored if ``flip``,
        and cropped at a random place (instead of the centre) when the subset asks for ``random_crop``."""
        item = self.items[index]
        crop_rng = rng if item.record.subset.random_crop else None
        array = resize_and_crop(open_rgb(item.record.path), item.bucket.resized_size, item.bucket.bucket_resolution,
                                crop_rng)
        if flip:
            array = array[:, ::-1].copy()
        return torch.from_numpy(array).permute(2, 0, 1).float().div(127.5).sub(1.0)

    def size_conditioning(self, index: int, flip: bool = False
                          ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """SDXL's (original height, width), (crop top, left), (target height, width) for this item, as sd-scripts
        computes them: the file's size, the bucket, and the crop ``get_crop_ltrb`` reports — the offset of the image
        fitted *inside* the bucket, whatever the real (centred or random) crop was — mirrored with a flip. Without
        bucketing the crop is (0, 0) and the original size the cropped one."""
        item = self.items[index]
        bucket_width, bucket_height = item.bucket.bucket_resolution
        target = (bucket_height, bucket_width)
        if not self.datasets[item.dataset_index].enable_bucket:
            return target, (0, 0), target
        image_width, image_height = item.original_size
        left, top, right, _ = fitted_crop_ltrb(item.bucket.bucket_resolution, item.original_size)
        if flip:
            left = bucket_width - right
        return (image_height, image_width), (int(top), int(left)), target

    def wants_flip(self, index: int, rng: random.Random) -> bool:
        """flip_aug: each time an image is used, mirror it with probability 1/2."""
        return self.items[index].record.subset.flip_aug and rng.random() < 0.5

    def log_summary(self) -> None:
        """The report sd-scripts users look for: subsets, bucket resolutions with counts, images with repeats."""
        for dataset_index, dataset in enumerate(self.datasets):
            logger.info("[Dataset %d] batch_size: %d, resolution: %s, enable_bucket: %s, bucket_no_upscale: %s",
                        dataset_index, self.batch_sizes[dataset_index], dataset.resolution, dataset.enable_bucket,
                        dataset.bucket_no_upscale)
            for subset_index, subset in enumerate(dataset.subsets):
                count = sum(1 for item in self.items if item.record.subset is subset)
                logger.info("  [Subset %d of Dataset %d] image_dir: %s, image_count: %d, num_repeats: %d%s",
                            subset_index, dataset_index, subset.image_dir, count, subset.num_repeats,
                            ", is_reg: True" if subset.is_reg else "")
        logger.info("number of images (including repeats): %d", self.num_images_with_repeats())
        for bucket_index, ((_, resolution), count) in enumerate(self.bucket_counts().items()):
            logger.info("bucket %d: resolution %s, count: %d", bucket_index, resolution, count)
        if self.items:
            mean_error = sum(abs(item.bucket.aspect_ratio_error) for item in self.items) / len(self.items)
            logger.info("mean ar error (without repeats): %.4f", mean_error)
        if self.skipped:
            logger.warning("%d file(s) skipped (unreadable, or no bucket fits); lycolab check-dataset lists each with "
                           "its reason", len(self.skipped))


def fitted_crop_ltrb(bucket: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """sd-scripts' ``BucketManager.get_crop_ltrb``: where the image, scaled to fit inside the bucket, would sit
    (left, top, right, bottom, as floats); SDXL's crop conditioning is read from it."""
    bucket_ratio, image_ratio = bucket[0] / bucket[1], image_size[0] / image_size[1]
    if bucket_ratio > image_ratio:
        width, height = bucket[1] * image_ratio, bucket[1]
    else:
        width, height = bucket[0], bucket[0] / image_ratio
    left, top = (bucket[0] - width) // 2, (bucket[1] - height) // 2
    return left, top, left + width, top + height


def _size_or_error(record: ImageRecord) -> tuple[int, int] | UnreadableImage:
    """Every image is decoded once here, so a broken file is found before training, not in the middle of it."""
    if record.problem is not None:
        return record.problem
    try:
        return verified_size(record.path)
    except UnreadableImage as error:
        return error


def _warn_missing_captions(subset, items: list[TrainItem]) -> None:
    missing = [item.record.path.name for item in items if not item.record.has_caption]
    if missing and not subset.class_tokens:
        logger.warning("%s: %d image(s) have no %s caption and no class_tokens, training them with an empty "
                       "caption: %s%s", subset.image_dir, len(missing), subset.caption_extension,
                       ", ".join(missing[:5]), " …" if len(missing) > 5 else "")


def balance_regularization(items: list[TrainItem]) -> list[TrainItem]:
    """sd-scripts' rule for regularisation images: repeat them until they match the training images (with repeats).

    The first pass takes each reg image with its own ``num_repeats`` until the count is reached (later ones are not
    used); further passes add one repeat per image in turn. Training images are returned unchanged.
    """
    train = [item for item in items if not item.record.is_reg]
    regs = [item for item in items if item.record.is_reg]
    target = sum(item.record.num_repeats for item in train)
    if not regs:
        return items
    if target == 0:
        return train  # regularisation images alone teach nothing
    used: list[TrainItem] = []
    count, first_pass = 0, True
    while count < target:
        for item in regs:
            if first_pass:
                used.append(item)
                count += item.record.num_repeats
            else:
                item.record.num_repeats += 1
                count += 1
            if count >= target:
                break
        first_pass = False
    if len(used) < len(regs):
        logger.info("%d of %d regularization images are used, to match %d training images", len(used), len(regs),
                    target)
    return train + used
