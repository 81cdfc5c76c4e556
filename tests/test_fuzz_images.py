"""Property-based: any image file, in any mode, size and state, with any bucket settings, is either trained at
exactly its bucket size or skipped with a reason naming it — check-dataset, the dataset and pixels() never raise."""

from __future__ import annotations

import functools
import io
import math
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from lycolab.config import ConfigError, DatasetConfig, SubsetConfig
from lycolab.data.buckets import MAX_CROP_FACTOR, BucketManager, NoBucketFits
from lycolab.data.dataset import BucketedDataset
from lycolab.data.report import check_dataset

# What we read (scan.IMAGE_EXTENSIONS) plus two formats PIL also opens, for files whose extension lies.
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".png", "GIF": ".png"}
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16",
         "I;16B", "F")
ANIMATED = ("PNG", "WEBP", "GIF", "TIFF")
NO_EXIF = ("BMP", "GIF")  # formats whose files carry no EXIF orientation
MAGIC = (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"GIF89a", b"II*\x00")


@functools.cache
def savable_modes(image_format: str) -> tuple[str, ...]:
    """The modes PIL can write in this format (as each format permits) and read back, found by trying a 2x2 image
    (Pillow 10.0 writes TIFF YCbCr files it cannot decode: we cannot read what PIL cannot)."""
    found = []
    for mode in MODES:
        buffer = io.BytesIO()
        try:
            Image.new(mode, (2, 2)).save(buffer, image_format)
            Image.open(buffer).load()
        except (OSError, ValueError, KeyError):
            continue
        found.append(mode)
    return tuple(found)


def noise_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixel bytes in any mode: float images get NaN/inf and 16/32-bit ones out-of-range values too."""
    length = len(Image.new(mode, size).tobytes())
    return Image.frombytes(mode, size, np.random.default_rng(seed).bytes(length))


@st.composite
def image_files(draw) -> tuple[str, bytes, tuple[int, int] | None]:
    """(file extension, file bytes, upright size) — the size is None when the file is not an intact image."""
    kind = draw(st.sampled_from(["image", "image", "image", "truncated", "empty", "random"]))
    if kind == "empty":
        return draw(st.sampled_from(sorted(set(EXTENSIONS.values())))), b"", None
    if kind == "random":
        data = draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=300))
        return draw(st.sampled_from([".png", ".jpg", ".webp", ".bmp"])), data, None
    image_format = draw(st.sampled_from(sorted(EXTENSIONS)))
    mode = draw(st.sampled_from(savable_modes(image_format)))
    long_side, short_side = draw(st.integers(1, 4096)), draw(st.integers(1, 12))  # modest pixel counts
    size = (long_side, short_side) if draw(st.booleans()) else (short_side, long_side)
    image = noise_image(mode, size, draw(st.integers(0, 2**32 - 1)))
    options, upright = {}, size
    orientation = draw(st.sampled_from([None, *range(10)]))  # 1-8 are valid; 0 and 9 must be ignored
    if orientation is not None and image_format not in NO_EXIF:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
        upright = (size[1], size[0]) if 5 <= orientation <= 8 else size
        if image_format == "TIFF":  # PIL applies a TIFF's orientation itself for some modes, not for others
            upright = None
    if mode in ("P", "PA") and image_format == "PNG" and draw(st.booleans()):
        options["transparency"] = draw(st.integers(0, 255) | st.binary(min_size=1, max_size=256))
    if image_format in ANIMATED and draw(st.booleans()):
        options.update(save_all=True, append_images=[noise_image(mode, size, seed) for seed in range(2)])
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    data = buffer.getvalue()
    extension = EXTENSIONS[image_format]
    if draw(st.booleans()):  # an extension that lies about the format
        extension = draw(st.sampled_from([".png", ".jpg", ".jpeg", ".webp", ".bmp"]))
    if kind == "truncated":
        return extension, data[: draw(st.integers(0, len(data) - 1))], None
    return extension, data, upright


CONFIG_STEPS, CONFIG_SIZES = st.sampled_from([8, 16, 32, 64]), st.integers(64, 384)


@st.composite
def bucket_settings(draw, steps=CONFIG_STEPS, sizes=CONFIG_SIZES) -> dict:
    """Valid settings (by default as the config file allows them: steps a multiple of 8, resolution >= 64)."""
    steps = draw(steps)
    width, height = draw(sizes.filter(lambda size: size >= steps)), draw(sizes.filter(lambda size: size >= steps))
    return dict(resolution=(width, height), enable_bucket=draw(st.booleans()),
                bucket_no_upscale=draw(st.booleans()), bucket_reso_steps=steps,
                min_bucket_reso=draw(st.integers(steps, min(width, height))),
                max_bucket_reso=draw(st.integers(max(width, height), 2048)))


def check_used(dataset: BucketedDataset, index: int, settings: dict) -> None:
    """A used image has a valid bucket and pixels() gives exactly that size, in [-1, 1]."""
    item = dataset.items[index]
    width, height = item.bucket.bucket_resolution
    assert width >= 1 and height >= 1
    if settings["enable_bucket"]:  # sd-scripts' buckets are whole steps (min/max are rounded to steps first)
        assert width % settings["bucket_reso_steps"] == 0 and height % settings["bucket_reso_steps"] == 0
    else:
        assert (width, height) == settings["resolution"]
    resized_width, resized_height = item.bucket.resized_size
    assert resized_width >= width and resized_height >= height
    assert resized_width * resized_height <= MAX_CROP_FACTOR * width * height
    for flip in (False, True):
        pixels = dataset.pixels(index, flip=flip, rng=random.Random(index))
        assert pixels.shape == (3, height, width) and pixels.dtype == torch.float32
        assert torch.isfinite(pixels).all() and pixels.min() >= -1.0 and pixels.max() <= 1.0


def png_file(size: tuple[int, int]) -> tuple[str, bytes, tuple[int, int]]:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return ".png", buffer.getvalue(), size


ISSUE_13 = dict(resolution=(64, 64), enable_bucket=True, bucket_no_upscale=True, bucket_reso_steps=64,
                min_bucket_reso=64, max_bucket_reso=1024)


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # PIL's notes on corrupt TIFF tags: not ours to show
@example(files=[png_file((1, 1)), png_file((64, 64))], settings_=ISSUE_13, random_crop=False)  # was ZeroDivisionError
@example(files=[png_file((1, 4096)), png_file((4096, 1))], settings_={**ISSUE_13, "bucket_no_upscale": False},
         random_crop=True)  # would be resized to gigabytes
@example(files=[png_file((4096, 1)), png_file((7, 9))], settings_={**ISSUE_13, "enable_bucket": False},
         random_crop=False)
@given(files=st.lists(image_files(), min_size=1, max_size=3), settings_=bucket_settings(),
       random_crop=st.booleans())
def test_every_image_file_is_used_at_its_bucket_size_or_skipped_with_its_name(files, settings_, random_crop):
    with tempfile.TemporaryDirectory() as directory:
        paths = []
        for index, (extension, data, _) in enumerate(files):
            paths.append(Path(directory) / f"file_{index}{extension}")
            paths[-1].write_bytes(data)
        subset = SubsetConfig(image_dir=directory, caption_extension=".txt", random_crop=random_crop)
        datasets = [DatasetConfig(subsets=[subset], **settings_)]
        report = check_dataset(datasets, batch_size=2)
        dataset = BucketedDataset(datasets, 2)
        manager = BucketManager(datasets[0])
        used = {item.record.path: index for index, item in enumerate(dataset.items)}
        assert report.usable_images == len(used) and report.bad_files == dataset.skipped
        for path, (_, _, upright) in zip(paths, files, strict=True):
            reasons = [line for line in dataset.skipped if line.startswith(f"{path}: ")]
            assert (path in used) != bool(reasons), f"{path} must be used or skipped, once"
            assert len(reasons) <= 1 and "Traceback" not in "".join(reasons)
            if upright is not None:  # an intact image: read upright, and skipped only when no bucket fits
                try:
                    expected = manager.select(*upright)
                except NoBucketFits as error:
                    assert reasons == [f"{path}: {error}"], reasons
                    continue
                assert dataset.items[used[path]].bucket == expected
            if path in used:
                check_used(dataset, used[path], settings_)


any_settings = st.fixed_dictionaries(dict(
    bucket_reso_steps=st.integers(-8, 128), min_bucket_reso=st.integers(-64, 1100),
    max_bucket_reso=st.integers(-64, 4200), resolution=st.tuples(st.integers(-1, 1100), st.integers(-1, 1100)),
    enable_bucket=st.booleans(), bucket_no_upscale=st.booleans()))


@given(settings_=any_settings | bucket_settings(steps=st.integers(1, 128), sizes=st.integers(1, 1100)),
       sizes=st.lists(st.tuples(st.integers(1, 100_000), st.integers(1, 100_000)), max_size=30))
def test_any_bucket_settings_give_a_config_error_naming_the_key_or_valid_buckets(settings_, sizes):
    dataset = DatasetConfig(**settings_)
    steps, enable_bucket = settings_["bucket_reso_steps"], settings_["enable_bucket"]
    try:
        manager = BucketManager(dataset)
    except ConfigError as error:
        assert any(key in str(error) for key in ("resolution", "bucket_reso_steps", "min_bucket_reso"))
        assert "\n" not in str(error)
        return
    if enable_bucket and not settings_["bucket_no_upscale"]:
        assert manager.predefined, "never an empty bucket list"
        assert all(w >= steps and h >= steps and w % steps == 0 and h % steps == 0 for w, h in manager.predefined)
    for width, height in sizes:
        try:
            choice = manager.select(width, height)
        except NoBucketFits as error:
            assert f"image is {width}x{height}" in str(error) and "\n" not in str(error)
            continue
        bucket_width, bucket_height = choice.bucket_resolution
        resized_width, resized_height = choice.resized_size
        assert 1 <= bucket_width <= resized_width and 1 <= bucket_height <= resized_height
        assert resized_width * resized_height <= MAX_CROP_FACTOR * bucket_width * bucket_height
        assert not enable_bucket or (bucket_width % steps == 0 and bucket_height % steps == 0)
        assert math.isfinite(choice.aspect_ratio_error)


@pytest.mark.parametrize("image_format", sorted(EXTENSIONS))
def test_every_mode_each_format_can_write_is_trained(tmp_path, image_format):
    # Not left to chance: every (format, mode) pair, with the reading extension, decodes to the bucket size.
    for mode in savable_modes(image_format):
        noise_image(mode, (80, 24), 7).save(tmp_path / f"{mode.replace(';', '_')}{EXTENSIONS[image_format]}",
                                            image_format)
    datasets = [DatasetConfig(subsets=[SubsetConfig(image_dir=str(tmp_path))], resolution=(64, 64),
                              enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)]
    dataset = BucketedDataset(datasets, 1)
    assert dataset.skipped == [] and len(dataset) == len(savable_modes(image_format)) >= 2
    # buckets for 64x64 in 32 px steps: 64x64, 96x32, 128x32 and the portrait ones; 80x24 (3.33) is nearest to
    # 96x32 (3.0), is wider than it so its height is fitted: 80*32/24 = 106.7 → resized 107x32, centre-cropped
    for index in range(len(dataset)):
        assert dataset.items[index].bucket.bucket_resolution == (96, 32)
        assert dataset.items[index].bucket.resized_size == (107, 32)
        assert dataset.pixels(index).shape == (3, 32, 96)
