"""The dataset doctor: exactly what training will use, before it starts (``lycolab check-dataset``, notebook 03).

It builds the same :class:`BucketedDataset` training builds — same scan, image checks, buckets and regularisation
balancing — and adds what a person should look at: images without captions, near-duplicate images, files that
are skipped and why, and files in the folders that are not used at all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from lycolab.config import DatasetConfig, SubsetConfig
from lycolab.data.buckets import bucket_range_including
from lycolab.data.dataset import BucketedDataset
from lycolab.data.images import UnreadableImage, open_rgb
from lycolab.data.scan import IMAGE_EXTENSIONS, caption_suffix, discover_subsets

# Near-duplicates: 64-bit difference hashes at most this many bits apart (resized, recompressed or lightly edited).
DUPLICATE_DISTANCE = 4
KNOWN_COMPANIONS = (".txt", ".caption", ".json", ".npz", ".safetensors")


@dataclass
class SubsetRow:
    image_dir: str
    images: int
    num_repeats: int
    is_reg: bool
    images_with_repeats: int
    missing_captions: int


@dataclass
class BucketRow:
    dataset: int
    resolution: tuple[int, int]
    images_with_repeats: int
    batches: int


@dataclass
class DatasetReport:
    """Everything ``check-dataset`` shows; ``rows()`` / ``bucket_rows()`` are the notebook's tables."""

    subsets: list[SubsetRow]
    buckets: list[BucketRow]
    batch_size: int
    usable_images: int
    images_per_epoch: int
    steps_per_epoch: int
    missing_captions: list[Path] = field(default_factory=list)
    duplicates: list[list[Path]] = field(default_factory=list)
    bad_files: list[str] = field(default_factory=list)  # "file: reason" per skipped image (unreadable, no bucket)
    unused_files: list[Path] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.usable_images > 0

    def rows(self) -> list[dict]:
        return [vars(row) for row in self.subsets]

    def bucket_rows(self) -> list[dict]:
        return [{**vars(row), "resolution": f"{row.resolution[0]}x{row.resolution[1]}"} for row in self.buckets]

    def __str__(self) -> str:
        return self.format()

    def _repr_html_(self) -> str:
        """The notebook view: the subset table, the bucket table and one line per kind of problem."""
        from lycolab.display import Table

        notes = [f"usable images: {self.usable_images}; per epoch with repeats: {self.images_per_epoch}; steps per "
                 f"epoch at batch size {self.batch_size}: {self.steps_per_epoch}"]
        for title, items in (("images without a caption", self.missing_captions),
                             ("groups of near-duplicate images", self.duplicates),
                             ("skipped files", self.bad_files), ("other files (not used)", self.unused_files)):
            if items:
                notes.append(f"{title}: {len(items)} — e.g. {', '.join(str(item) for item in items[:3])}")
        if not self.usable:
            notes.append("nothing usable: add images (png, jpg, jpeg, webp, bmp) to the image folders")
        skipped = [{"file: reason": reason} for reason in self.bad_files]  # every one: each needs fixing by hand
        return (Table(self.rows(), title="dataset")._repr_html_()
                + Table(self.bucket_rows(), title="buckets", notes=notes)._repr_html_()
                + (Table(skipped, title="skipped files")._repr_html_() if skipped else ""))

    def format(self) -> str:
        """The report as plain text for the terminal."""
        lines = [f"{'image_dir':<40} {'images':>6} {'repeats':>7} {'reg':>3} {'per epoch':>9} {'no caption':>10}"]
        for row in self.subsets:
            lines.append(f"{_shorten(row.image_dir, 40):<40} {row.images:>6} {row.num_repeats:>7} "
                         f"{'yes' if row.is_reg else '':>3} {row.images_with_repeats:>9} {row.missing_captions:>10}")
        lines += ["", f"usable images: {self.usable_images}; per epoch with repeats: {self.images_per_epoch}; "
                      f"steps per epoch at batch size {self.batch_size}: {self.steps_per_epoch}", "",
                  "bucket (w x h)   images   batches"]
        lines += [f"{row.resolution[0]:>5} x {row.resolution[1]:<6} {row.images_with_repeats:>8} {row.batches:>9}"
                  for row in self.buckets]
        sections = (("images without a caption (class_tokens or an empty caption is used)", self.missing_captions),
                    ("near-duplicate images", [", ".join(p.name for p in group) for group in self.duplicates]),
                    ("skipped files", self.bad_files),
                    ("other files in the folders (not used)", self.unused_files))
        for title, items in sections:
            if items:
                shown = items if items is self.bad_files else items[:20]  # every skipped file, with its reason
                lines += ["", f"{title}: {len(items)}"] + [f"  {item}" for item in shown]
                lines += [f"  … and {len(items) - len(shown)} more"] if len(items) > len(shown) else []
        if not self.usable:
            lines += ["", "nothing usable: add images (png, jpg, jpeg, webp, bmp) to the image folders"]
        return "\n".join(lines)


def folder_datasets(image_dir: str | Path, resolution: str = "512", caption_extension: str = ".txt"
                    ) -> list[DatasetConfig]:
    """One bucketed dataset from a folder: its own images plus every subfolder (``N_name`` gives N repeats).

    Buckets span sd-scripts' defaults (256 to 1024 px), widened to include ``resolution`` as sd-scripts requires.
    """
    from lycolab.config import ConfigError, parse_resolution

    if not Path(image_dir).is_dir():
        raise ConfigError(f"{image_dir}: folder not found; give the folder that holds the images")
    try:
        width, height = parse_resolution(resolution)
    except TypeError:
        raise ConfigError(f"resolution must be a number of pixels or width,height (got {resolution!r})") from None
    steps = DatasetConfig.bucket_reso_steps
    if min(width, height) < steps:
        raise ConfigError(f"resolution {width}x{height} is too small: at least {steps} px (512 is usual)")
    subsets = [dataclasses.replace(subset, caption_extension=caption_extension)
               for subset in discover_subsets(image_dir, default_repeats=1)]
    if not subsets:
        subsets = [SubsetConfig(image_dir=str(image_dir), caption_extension=caption_extension)]
    low, high = bucket_range_including((width, height), DatasetConfig.min_bucket_reso, DatasetConfig.max_bucket_reso,
                                       steps)
    return [DatasetConfig(subsets=subsets, resolution=(width, height), enable_bucket=True, min_bucket_reso=low,
                          max_bucket_reso=high)]


def check_dataset(datasets: list[DatasetConfig], batch_size: int = 1, find_duplicates: bool = True
                  ) -> DatasetReport:
    """Build the training set as training would and report on it (nothing is written)."""
    dataset = BucketedDataset(datasets, batch_size)
    subsets = []
    missing: list[Path] = []
    for dataset_config in datasets:
        for subset in dataset_config.subsets:
            items = [item for item in dataset.items if item.record.subset is subset]
            uncaptioned = [item.record.path for item in items if not item.record.has_caption]
            missing += uncaptioned
            subsets.append(SubsetRow(subset.image_dir, len(items), subset.num_repeats, subset.is_reg,
                                     sum(item.record.num_repeats for item in items), len(uncaptioned)))
    buckets = [BucketRow(index, resolution, count, math.ceil(count / dataset.batch_sizes[index]))
               for (index, resolution), count in dataset.bucket_counts().items()]
    paths = [item.record.path for item in dataset.items]
    return DatasetReport(
        subsets=subsets, buckets=buckets, batch_size=batch_size, usable_images=len(dataset),
        images_per_epoch=dataset.num_images_with_repeats(), steps_per_epoch=dataset.batches_per_epoch(),
        missing_captions=missing, duplicates=find_near_duplicates(paths) if find_duplicates else [],
        bad_files=list(dataset.skipped), unused_files=unused_files(datasets),
    )


def difference_hash(path: Path) -> int:
    """64-bit dHash: is each pixel of a 9x8 grey thumbnail brighter than its right neighbour."""
    thumbnail = open_rgb(path).convert("L").resize((9, 8))
    pixels = list(thumbnail.getdata())
    bits = 0
    for row in range(8):
        for column in range(8):
            bits = (bits << 1) | (pixels[row * 9 + column] > pixels[row * 9 + column + 1])
    return bits


def find_near_duplicates(paths: list[Path], distance: int = DUPLICATE_DISTANCE) -> list[list[Path]]:
    """Groups of images whose hashes differ in at most ``distance`` bits (each image in one group at most)."""
    hashes = []
    for path in dict.fromkeys(paths):
        try:
            hashes.append((path, difference_hash(path)))
        except UnreadableImage:
            continue
    groups: list[list[Path]] = []
    grouped: set[int] = set()
    for i, (path, value) in enumerate(hashes):
        if i in grouped:
            continue
        group = [path]
        for j in range(i + 1, len(hashes)):
            if j not in grouped and (value ^ hashes[j][1]).bit_count() <= distance:
                grouped.add(j)
                group.append(hashes[j][0])
        if len(group) > 1:
            groups.append(group)
    return groups


def unused_files(datasets: list[DatasetConfig]) -> list[Path]:
    """Files in the image folders that are neither images training reads nor their captions/caches."""
    companions: dict[str, set[str]] = {}
    for dataset in datasets:
        for subset in dataset.subsets:
            companions.setdefault(subset.image_dir, set(KNOWN_COMPANIONS)).add(
                caption_suffix(subset.caption_extension).lower())
    found = []
    for directory, known in companions.items():
        for path in sorted(Path(directory).iterdir()):
            suffix = path.suffix.lower()
            if path.is_file() and suffix not in IMAGE_EXTENSIONS and suffix not in known \
                    and not path.name.startswith("."):
                found.append(path)
    return found


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
