"""Messy folders: odd and broken files, regularisation balancing, seeded dropouts, the latent disk cache and the
dataset doctor."""

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lycolab.config import ConfigError, DatasetConfig, SubsetConfig, load_config
from lycolab.data import BucketedDataset
from lycolab.data.buckets import BucketManager, make_bucket_resolutions
from lycolab.data.captions import process_caption
from lycolab.data.images import open_rgb, to_rgb
from lycolab.data.report import check_dataset, folder_datasets

BAD_FILES = ("empty.png", "not_an_image.png", "truncated.jpg", "huge.png")


def _write_odd_folder(folder):
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "good.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.save(folder / "palette.png", transparency=0)
    Image.new("LA", (64, 64), (0, 0)).save(folder / "gray_alpha.png")
    Image.new("RGBA", (64, 48), (255, 0, 0, 0)).save(folder / "rgba.png")
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(folder / "gray16.png")
    frames = [Image.new("RGB", (64, 64), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° to portrait
    Image.new("RGB", (96, 48), (0, 0, 0)).save(folder / "rotated.jpg", exif=exif.tobytes())
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "ümlaut cat 猫.PNG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "not_an_image.png").write_text("hello", encoding="utf-8")
    Image.new("RGB", (256, 256), (9, 9, 9)).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    Image.new("1", (9000, 9000)).save(folder / "huge.png")


def test_odd_and_broken_files_never_crash_and_each_bad_file_is_named_once(tmp_path, caplog):
    folder = tmp_path / "5_odd"
    _write_odd_folder(folder)
    datasets = [DatasetConfig(subsets=[SubsetConfig(image_dir=str(folder))], resolution=(64, 64),
                              enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)]
    with caplog.at_level(logging.WARNING):
        dataset = BucketedDataset(datasets, 2)
    assert len(dataset) == 9
    for name in BAD_FILES:
        assert sum(name in message for message in dataset.skipped) == 1
        assert sum(name in record.getMessage() for record in caplog.records) == 1
    reasons = " ".join(dataset.skipped)
    assert "empty file" in reasons and "not an image" in reasons and "truncated" in reasons
    assert "megapixels" in reasons
    by_name = {item.record.path.name: index for index, item in enumerate(dataset.items)}
    _, height, width = dataset.pixels(by_name["rotated.jpg"]).shape
    assert height > width  # stored 96x48 landscape, portrait after EXIF rotation
    for index in range(len(dataset)):  # every usable image decodes to the bucket size
        item = dataset.items[index]
        width, height = item.bucket.bucket_resolution
        assert dataset.pixels(index).shape == (3, height, width)


def test_modes_become_sensible_rgb(tmp_path):
    folder = tmp_path / "odd"
    _write_odd_folder(folder)
    assert open_rgb(folder / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    assert open_rgb(folder / "gray_alpha.png").getpixel((0, 0)) == (255, 255, 255)
    assert open_rgb(folder / "palette.png").getpixel((0, 0)) == (255, 255, 255)
    assert open_rgb(folder / "gray16.png").getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to white
    assert open_rgb(folder / "animated.png").getpixel((0, 0)) == (255, 0, 0)  # first frame
    red, green, blue = open_rgb(folder / "cmyk.jpg").getpixel((0, 0))
    assert red > 200 and green < 60 and blue < 60
    assert to_rgb(Image.fromarray(np.full((4, 4), 0.5, np.float32), "F")).getpixel((0, 0)) == (128, 128, 128)


def test_bucket_list_and_choice_for_256_with_small_limits():
    # Worked by hand from sd-scripts' rules: max area 256², widths 128..512 step 64, height = area // width
    # rounded down to 64, both orientations, plus the square.
    assert make_bucket_resolutions((256, 256), 128, 512, 64) == [
        (128, 384), (128, 448), (128, 512), (192, 320), (256, 256), (320, 192), (384, 128), (448, 128), (512, 128)]
    manager = BucketManager(DatasetConfig(resolution=(256, 256), enable_bucket=True, min_bucket_reso=128,
                                          max_bucket_reso=512))
    choice = manager.select(1000, 500)  # ratio 2.0: nearest is 320x192 (1.67); wider than it → fit the height
    assert choice.bucket_resolution == (320, 192) and choice.resized_size == (384, 192)


def _records(tmp_path, counts):
    datasets = []
    subsets = []
    for name, (images, repeats, is_reg) in counts.items():
        folder = tmp_path / name
        folder.mkdir()
        for index in range(images):
            Image.new("RGB", (64, 64), (index * 30, 0, 0)).save(folder / f"{index}.png")
        subsets.append(SubsetConfig(image_dir=str(folder), num_repeats=repeats, is_reg=is_reg, class_tokens=name))
    datasets.append(DatasetConfig(subsets=subsets, resolution=(64, 64)))
    return datasets


def test_regularization_images_are_balanced_to_the_training_images_like_sd_scripts(tmp_path):
    # 3 training images x 10 repeats = 30; 4 reg images x 1: first pass 4, then +1 each in turn up to 30.
    dataset = BucketedDataset(_records(tmp_path, {"train": (3, 10, False), "reg": (4, 1, True)}), 1)
    reg_repeats = [item.record.num_repeats for item in dataset.items if item.record.is_reg]
    assert sum(reg_repeats) == 30 and reg_repeats == [8, 8, 7, 7]
    # more reg images (with repeats) than training images: the first ones that reach the count are used
    (tmp_path / "b").mkdir()
    dataset = BucketedDataset(_records(tmp_path / "b", {"train": (2, 1, False), "reg": (5, 1, True)}), 1)
    assert sum(1 for item in dataset.items if item.record.is_reg) == 2


def test_caption_and_tag_dropout_are_seeded_and_reproducible():
    subset = SubsetConfig(image_dir=".", shuffle_caption=True, caption_dropout_rate=0.3,
                          caption_tag_dropout_rate=0.2, keep_tokens=1)
    caption = "sks, a, b, c, d, e, f"

    def run(seed):
        rng = random.Random(seed)
        return [process_caption(caption, subset, rng, epoch) for epoch in range(1, 40)]

    first = run(7)
    assert first == run(7) and first != run(8)
    assert "" in first and any(0 < len(text.split(", ")) < 7 for text in first if text)
    assert all(text.startswith("sks") for text in first if text)


def test_latent_disk_cache_is_reused_and_invalidated(tiny_sd, tmp_path):
    from lycolab.training.latent_cache import LatentCache, cache_path

    datasets = _records(tmp_path, {"train": (3, 1, False)})
    datasets[0].subsets[0].flip_aug = True
    dataset = BucketedDataset(datasets, 1)
    first = LatentCache(dataset, tiny_sd.vae, 2, to_disk=True)
    assert first.loaded_from_disk == 0 and all(cache_path(item.record.path).is_file() for item in dataset.items)
    second = LatentCache(dataset, tiny_sd.vae, 2, to_disk=True)
    assert second.loaded_from_disk == 3
    torch.testing.assert_close(second.get(1, flip=True), first.get(1, flip=True))
    Image.new("RGB", (64, 64), (0, 0, 255)).save(dataset.items[0].record.path)  # the image changed
    assert LatentCache(dataset, tiny_sd.vae, 2, to_disk=True).loaded_from_disk == 2
    with torch.no_grad():
        tiny_sd.vae.encoder.conv_in.weight.mul_(1.01)  # another VAE
    assert LatentCache(dataset, tiny_sd.vae, 2, to_disk=True).loaded_from_disk == 0


def test_random_crop_with_cached_latents_is_refused(tmp_path):
    folder = tmp_path / "3_x"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    dataset_file = tmp_path / "dataset.toml"
    dataset_file.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{folder}"\nrandom_crop = true\n',
                            encoding="utf-8")
    with pytest.raises(ConfigError, match="random_crop cannot be used with cache_latents"):
        load_config(dataset_config=dataset_file, overrides={"cache_latents": True, "output_dir": "o"})


def test_dataset_doctor_report_and_exit_codes(tmp_path, capsys):
    from lycolab.cli import main

    _write_odd_folder(tmp_path / "data" / "5_odd")
    (tmp_path / "data" / "5_odd" / "good.txt").write_text("a caption", encoding="utf-8")
    (tmp_path / "data" / "5_odd" / "notes.docx").write_bytes(b"x")
    report = check_dataset(folder_datasets(tmp_path / "data", "64"), batch_size=2)
    assert report.usable_images == 9 and report.images_per_epoch == 45
    assert report.steps_per_epoch == sum(row.batches for row in report.buckets)
    assert len(report.missing_captions) == 8 and len(report.bad_files) == 4
    assert [path.name for path in report.unused_files] == ["notes.docx"]
    # every usable image there is a flat colour, which all hash alike
    assert len(report.duplicates) == 1 and {"good.png", "ümlaut cat 猫.PNG"} <= {p.name for p in report.duplicates[0]}
    assert report.rows()[0]["images_with_repeats"] == 45
    assert main(["check-dataset", str(tmp_path / "data"), "--resolution", "64"]) == 0
    output = capsys.readouterr().out
    assert "usable images: 9" in output and output.count("truncated.jpg") == 1
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "broken.png").write_bytes(b"")
    assert main(["check-dataset", str(tmp_path / "empty")]) == 1
    assert "nothing usable" in capsys.readouterr().out


def test_near_duplicates_are_found_after_resizing_and_recompression(tmp_path):
    from lycolab.data.report import find_near_duplicates

    x, y = np.meshgrid(np.linspace(0, 1, 256), np.linspace(0, 1, 256))
    original = Image.fromarray((np.stack([x, y, x * y], -1) * 255).astype(np.uint8))
    original.save(tmp_path / "a.png")
    original.resize((200, 200)).save(tmp_path / "a_small.jpg", quality=70)
    Image.fromarray((np.stack([1 - x, 1 - x, y], -1) * 255).astype(np.uint8)).save(tmp_path / "other.png")
    groups = find_near_duplicates([tmp_path / "a.png", tmp_path / "other.png", tmp_path / "a_small.jpg"])
    assert [[path.name for path in group] for group in groups] == [["a.png", "a_small.jpg"]]


def _write_issue_13_folder(folder):
    """The folder from issue 13: a 1x1 PNG beside a good image and two broken files."""
    folder.mkdir(parents=True)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "one_pixel.png")
    Image.new("RGB", (64, 64), (0, 128, 255)).save(folder / "good.png")
    Image.new("RGB", (4096, 1), (0, 0, 0)).save(folder / "one_row.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "not_an_image.jpg").write_text("hello", encoding="utf-8")
    dataset_file = folder.parent / "dataset_config.toml"
    dataset_file.write_text(f'[general]\nenable_bucket = true\nbucket_no_upscale = true\nresolution = 64\n'
                            f'min_bucket_reso = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{folder}"\n',
                            encoding="utf-8")
    return dataset_file


EXPECTED_SKIPS = {
    "one_pixel.png": "image is 1x1: with bucket_no_upscale its width is below one bucket step (64 px)",
    "one_row.png": "image is 4096x1: with bucket_no_upscale its height is below one bucket step (64 px)",
    "empty.png": "empty file (0 bytes)",
    "not_an_image.jpg": "not an image file",
}


def test_regression_issue_13_one_pixel_png_with_bucket_no_upscale_no_longer_crashes_check_dataset(tmp_path, capsys):
    # Was: ZeroDivisionError in BucketManager.select (the 1x1 image's bucket rounds down to 0x0) — a traceback,
    # and none of the other bad files named. Now it is one skipped file among the others, each with its reason.
    from lycolab.cli import main
    from lycolab.config import read_dataset_config

    folder = tmp_path / "data" / "5_issue"
    dataset_file = _write_issue_13_folder(folder)
    report = check_dataset(read_dataset_config(dataset_file))
    assert report.usable_images == 1 and report.images_per_epoch == 1
    assert [(row.resolution, row.images_with_repeats) for row in report.buckets] == [((64, 64), 1)]
    assert len(report.bad_files) == len(EXPECTED_SKIPS)
    for name, reason in EXPECTED_SKIPS.items():
        [line] = [line for line in report.bad_files if line.startswith(str(folder / name) + ": ")]
        assert reason in line
    assert main(["check-dataset", "--dataset_config", str(dataset_file)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and "usable images: 1" in captured.out
    assert "skipped files: 4" in captured.out
    for name, reason in EXPECTED_SKIPS.items():
        assert f"{folder / name}: " in captured.out and reason in captured.out


def test_regression_issue_13_training_data_and_latent_cache_skip_the_one_pixel_png(tmp_path, tiny_sd, caplog):
    # Training builds the same BucketedDataset and encodes BucketedDataset.pixels() into the latent cache.
    from lycolab.config import read_dataset_config
    from lycolab.training.latent_cache import LatentCache

    dataset_file = _write_issue_13_folder(tmp_path / "data" / "5_issue")
    with caplog.at_level(logging.WARNING):
        dataset = BucketedDataset(read_dataset_config(dataset_file), 1)
        dataset.log_summary()
    assert [item.record.path.name for item in dataset.items] == ["good.png"]
    assert "4 file(s) skipped (unreadable, or no bucket fits)" in caplog.text
    assert sum("one_pixel.png" in record.getMessage() for record in caplog.records) == 1
    cache = LatentCache(dataset, tiny_sd.vae, 2)
    assert cache.get(0).shape == (4, 8, 8)  # the 64x64 bucket, 8x downscaled


def test_doctor_lists_every_skipped_file_with_its_reason_in_text_and_notebook_views(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "good.png")
    for index in range(25):  # more than the 20 lines other sections show
        (folder / f"broken_{index:02d}.png").write_bytes(b"x")
    Image.new("RGB", (1, 64)).save(folder / "sliver.png")  # a 1:64 sliver keeps 1/16 of itself in a 1:4 bucket
    report = check_dataset(folder_datasets(folder, "64"))
    assert report.usable_images == 1 and len(report.bad_files) == 26
    text = report.format()
    assert "skipped files: 26" in text and "… and" not in text
    assert all(line in text for line in report.bad_files)
    assert "sliver.png: image is 1x64, too long and thin for any bucket" in text
    page = report._repr_html_()
    assert "skipped files: 26" in page and page.count("<td>" + str(folder)) == 26 + 1  # + the subset row
    assert "broken_24.png: cannot read image (not an image file" in page


def test_an_image_whose_caption_file_cannot_be_read_is_skipped_not_trained_without_its_caption(tmp_path,
                                                                                             monkeypatch):
    folder = tmp_path / "3_x"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes(b"\xef\xbb\xbfsks, \xff\x00cat\r\nsecond line")
    read_text = Path.read_text

    def unreadable_b(path, *args, **kwargs):  # root reads any file, so a permission error is simulated for one
        if path.name == "b.txt":
            raise PermissionError(13, "Permission denied")
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable_b)
    report = check_dataset(folder_datasets(tmp_path, "64"))
    assert report.usable_images == 1
    assert report.bad_files == [f"{folder / 'b.png'}: its caption file b.txt cannot be read (Permission denied); "
                                "fix its permissions or delete it"]
    dataset = BucketedDataset(folder_datasets(tmp_path, "64"), 1)
    assert dataset.items[0].record.caption == "sks, \ufffdcat"  # BOM and NUL dropped, bad UTF-8 marked, line 1
