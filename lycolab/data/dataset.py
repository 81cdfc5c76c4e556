"""The training set: every usable image with its bucket, and per-epoch batches drawn one bucket at a time."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass

import torch

from lycolab.config import DatasetConfig
from lycolab.data.buckets import BucketChoice, BucketManager
from lycolab.data.captions import process_caption
from lycolab.data.images import UnreadableImage, image_size, open_rgb, resize_and_crop
from lycolab.data.scan import ImageRecord, scan_subset

logger = logging.getLogger(__name__)


@dataclass
class TrainItem:
    """One usable image, its bucket and which dataset (hence batch size) it belongs to."""

    record: ImageRecord
    bucket: BucketChoice
    dataset_index: int


class BucketedDataset:
    """Images grouped by bucket; batches never mix bucket sizes, as the U-Net needs one size per batch."""

    def __init__(self, datasets: list[DatasetConfig], default_batch_size: int, seed: int = 0):
        self.datasets = datasets
        self.batch_sizes = [dataset.batch_size or default_batch_size for dataset in datasets]
        self.seed = seed
        self.items: list[TrainItem] = []
        self.skipped: list[str] = []
        for dataset_index, dataset in enumerate(datasets):
            manager = BucketManager(dataset)
            for subset in dataset.subsets:
                for record in scan_subset(subset):
                    self._add(record, manager, dataset_index)

    def _add(self, record: ImageRecord, manager: BucketManager, dataset_index: int) -> None:
        try:
            width, height = image_size(record.path)
        except UnreadableImage as error:
            logger.warning("skipping %s", error)
            self.skipped.append(str(error))
            return
        self.items.append(TrainItem(record, manager.select(width, height), dataset_index))

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

    def batches_per_epoch(self) -> int:
        """Batches in one epoch: each bucket's images (with repeats) split into batch-size chunks."""
        return sum(
            math.ceil(count / self.batch_sizes[dataset_index])
            for (dataset_index, _), count in self.bucket_counts().items()
        )

    def make_batches(self, epoch: int) -> list[list[int]]:
        """Item indices per batch for this epoch: shuffled within each bucket, then batch order shuffled."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        by_bucket: dict[tuple[int, tuple[int, int]], list[int]] = {}
        for index, item in enumerate(self.items):
            key = (item.dataset_index, item.bucket.bucket_resolution)
            by_bucket.setdefault(key, []).extend([index] * item.record.num_repeats)
        batches = []
        for (dataset_index, _), indices in sorted(by_bucket.items()):
            rng.shuffle(indices)
            size = self.batch_sizes[dataset_index]
            batches += [indices[start : start + size] for start in range(0, len(indices), size)]
        rng.shuffle(batches)
        return batches

    def caption(self, index: int, rng: random.Random, epoch: int) -> str:
        item = self.items[index]
        return process_caption(item.record.caption, item.record.subset, rng, epoch)

    def pixels(self, index: int) -> torch.Tensor:
        """The image resized and cropped to its bucket, as a 3xHxW float tensor in [-1, 1]."""
        item = self.items[index]
        array = resize_and_crop(open_rgb(item.record.path), item.bucket.resized_size, item.bucket.bucket_resolution)
        return torch.from_numpy(array).permute(2, 0, 1).float().div(127.5).sub(1.0)

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
            logger.warning("%d file(s) skipped as unreadable", len(self.skipped))
