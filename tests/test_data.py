import logging
import random
from pathlib import Path

import pytest
from conftest import write_images

from lycolab.config import ConfigError, DatasetConfig, SubsetConfig
from lycolab.data import BucketedDataset, BucketManager, discover_subsets, make_bucket_resolutions, process_caption
from lycolab.data.buckets import MAX_CROP_FACTOR, BucketChoice, NoBucketFits
from lycolab.data.scan import parse_repeat_folder, scan_subset

# sd-scripts' bucket list for resolution 512, min 256, max 1024, steps 64, worked out from its rules:
# square = floor(sqrt(512*512)/64)*64 = 512; for each width w in 256..1024 step 64,
# h = min(1024, floor(262144/w/64)*64), kept when h >= 256, added as (w, h) and (h, w).
SD_SCRIPTS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_bucket_list_matches_sd_scripts_for_512():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD_SCRIPTS_512


def test_bucket_list_for_768_with_small_steps():
    resolutions = make_bucket_resolutions((768, 768), 320, 1536, 32)
    assert (768, 768) in resolutions
    assert all(w % 32 == 0 and h % 32 == 0 and w * h <= 768 * 768 for w, h in resolutions)
    # width 320: floor(589824/320=1843.2 → 1843/32=57)*32 = 1824 → capped at 1536
    assert (320, 1536) in resolutions and (1536, 320) in resolutions


def _manager(**kwargs):
    return BucketManager(DatasetConfig(enable_bucket=True, **kwargs))


def test_bucket_choice_for_known_sizes():
    manager = _manager(resolution=(512, 512))
    # exact bucket size: kept as is
    assert manager.select(512, 512).bucket_resolution == (512, 512)
    # 2:3 portrait: nearest ratio is 384x640 (0.600 vs 0.667) not 448x576 (0.778); height fits → scale 640/768
    choice = manager.select(512, 768)
    assert choice.bucket_resolution == (384, 640) and choice.resized_size == (427, 640)
    # 3:2 landscape mirrors it
    assert manager.select(768, 512).bucket_resolution == (640, 384)
    # small images are upscaled to cover their bucket
    assert manager.select(300, 400).bucket_resolution == (448, 576)
    assert manager.select(300, 400).resized_size == (448, 597)


def test_bucket_no_upscale_keeps_small_images_and_shrinks_large_ones():
    manager = _manager(resolution=(512, 512), bucket_no_upscale=True)
    small = manager.select(300, 400)
    assert small.resized_size == (300, 400) and small.bucket_resolution == (256, 384)
    # 1024x768 (4:3) has area 786432 > 262144: rounding height first keeps the ratio exactly → 512x384
    large = manager.select(1024, 768)
    assert large.resized_size == (512, 384) and large.bucket_resolution == (512, 384)


def test_bucketing_disabled_crops_everything_to_resolution():
    manager = BucketManager(DatasetConfig(enable_bucket=False, resolution=(256, 256)))
    choice = manager.select(300, 600)
    assert choice.bucket_resolution == (256, 256) and choice.resized_size == (256, 512)


def _subset(**kwargs):
    return SubsetConfig(image_dir=".", **kwargs)


def test_keep_tokens_keeps_first_tags_in_place():
    caption = "sks, 1girl, red hair, blue eyes, smile, solo, looking at viewer"
    subset = _subset(shuffle_caption=True, keep_tokens=2)
    rng = random.Random(0)
    results = {process_caption(caption, subset, rng) for _ in range(30)}
    assert len(results) > 1, "the rest must be shuffled"
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["sks", "1girl"]
        assert sorted(tags[2:]) == sorted(["red hair", "blue eyes", "smile", "solo", "looking at viewer"])


def test_keep_tokens_separator_fixes_the_part_before_it():
    subset = _subset(shuffle_caption=True, keep_tokens_separator="|||")
    result = process_caption("sks, girl ||| a, b, c, d", subset, random.Random(1))
    assert result.split(", ")[:2] == ["sks", "girl"]


def test_caption_unchanged_without_shuffle():
    assert process_caption("b, a, c", _subset(keep_tokens=1), random.Random(0)) == "b, a, c"


def test_repeat_folder_names():
    assert parse_repeat_folder("10_sks dog") == (10, "sks dog")
    assert parse_repeat_folder("3_my_char") == (3, "my_char")  # sd-scripts keeps the underscores
    assert parse_repeat_folder("images") is None


def test_discover_subsets_one_per_folder_with_images(tmp_path):
    write_images(tmp_path, [(64, 64)])
    write_images(tmp_path / "5_cat", [(64, 64)] * 2)
    write_images(tmp_path / "plain" / "2_dog", [(64, 64)])
    (tmp_path / "empty").mkdir()
    subsets = discover_subsets(tmp_path, default_repeats=7, class_tokens="thing")
    found = {(s.image_dir.replace(str(tmp_path), ""), s.num_repeats, s.class_tokens) for s in subsets}
    assert found == {("", 7, "thing"), ("/5_cat", 5, "cat"), ("/plain/2_dog", 2, "dog")}


def test_missing_caption_falls_back_to_class_tokens(tmp_path):
    paths = write_images(tmp_path, [(64, 64)] * 2, captions=["a, b"])
    paths[1].with_suffix(".txt").unlink()
    records = scan_subset(SubsetConfig(image_dir=str(tmp_path), caption_extension=".txt", class_tokens="sks"))
    assert [r.caption for r in records] == ["a, b", "sks"]


def test_dataset_batches_never_mix_buckets_and_count_repeats(tmp_path, caplog):
    write_images(tmp_path / "sq", [(128, 128)] * 3, captions=["x"])
    write_images(tmp_path / "tall", [(96, 160)] * 2, captions=["y"])
    (tmp_path / "sq" / "broken.png").write_bytes(b"not an image")
    dataset_config = DatasetConfig(
        subsets=[SubsetConfig(image_dir=str(tmp_path / "sq"), num_repeats=2, caption_extension=".txt"),
                 SubsetConfig(image_dir=str(tmp_path / "tall"), num_repeats=3, caption_extension=".txt")],
        resolution=(128, 128), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=32,
    )
    with caplog.at_level(logging.INFO):
        dataset = BucketedDataset([dataset_config], default_batch_size=4, seed=1)
        dataset.log_summary()
    assert len(dataset) == 5 and len(dataset.skipped) == 1 and "broken.png" in dataset.skipped[0]
    assert dataset.bucket_counts() == {(0, (96, 160)): 6, (0, (128, 128)): 6}
    assert dataset.num_images_with_repeats() == 12
    batches = dataset.make_batches(epoch=1)
    assert len(batches) == dataset.batches_per_epoch() == 4
    assert sorted(len(batch) for batch in batches) == [2, 2, 4, 4]
    for batch in batches:
        assert len({dataset.items[i].bucket.bucket_resolution for i in batch}) == 1
    first = batches[0][0]
    assert dataset.pixels(first).shape[1:] == tuple(reversed(dataset.items[first].bucket.bucket_resolution))
    log = caplog.text
    assert "number of images (including repeats): 12" in log
    assert "bucket 0: resolution (96, 160), count: 6" in log


def test_images_below_one_bucket_step_are_skipped_with_no_upscale_and_upscaled_without():
    # sd-scripts rounds a no_upscale bucket down to whole steps: 1x1 gives a 0x0 bucket and it divides by zero.
    no_upscale = _manager(resolution=(512, 512), bucket_no_upscale=True)
    for size, side in (((1, 1), "width"), ((63, 4096), "width"), ((4096, 63), "height")):
        with pytest.raises(NoBucketFits, match=f"image is {size[0]}x{size[1]}: with bucket_no_upscale its {side} is "
                                               "below one bucket step \\(64 px\\)"):
            no_upscale.select(*size)
    assert no_upscale.select(64, 64).bucket_resolution == (64, 64)  # exactly one step is enough
    # 64x1000000 is shrunk to the area budget first: sqrt(262144/15625) = 4.1 px wide, rounds to a 0 px bucket
    with pytest.raises(NoBucketFits, match="shrunk to 4x64000"):
        no_upscale.select(64, 1_000_000)
    # without no_upscale a tiny image is upscaled to cover sd-scripts' bucket, as sd-scripts does
    upscale = _manager(resolution=(512, 512))
    assert upscale.select(1, 1) == BucketChoice((512, 512), (512, 512), 0.0)
    # 1x3 (ratio 0.333): nearest ratio is 256x832 (0.308, not 320x768 at 0.417); taller than it → fit the height
    assert upscale.select(1, 3).bucket_resolution == (256, 832) and upscale.select(1, 3).resized_size == (277, 832)


def test_crop_keeping_less_than_an_eighth_of_the_image_is_skipped_with_or_without_buckets():
    manager = _manager(resolution=(512, 512))
    # 1x32 → bucket 256x1024, resized 256x8192: exactly 8 bucket areas, the largest crop still allowed
    assert manager.select(1, 32) == BucketChoice((256, 1024), (256, 8192), 0.25 - 1 / 32)
    assert MAX_CROP_FACTOR == 8
    for size in ((1, 33), (1, 4096), (4096, 1), (64, 4096)):  # 1x4096 would be resized to 256x1048576
        with pytest.raises(NoBucketFits, match="too long and thin for any bucket.*raise max_bucket_reso"):
            manager.select(*size)
    fixed = BucketManager(DatasetConfig(enable_bucket=False, resolution=(512, 512)))
    assert fixed.select(64, 512).resized_size == (512, 4096)  # 8x the 512x512 crop: kept
    with pytest.raises(NoBucketFits, match="keep only 12% of it .*set enable_bucket = true"):
        fixed.select(63, 512)  # 512x4161: the crop keeps 12.3%
    with pytest.raises(NoBucketFits, match="image is 1x4096"):
        fixed.select(1, 4096)


def test_min_and_max_bucket_reso_are_rounded_to_steps_like_sd_scripts(caplog):
    # sd-scripts rounds min_bucket_reso down and max_bucket_reso up to multiples of bucket_reso_steps (warning)
    with caplog.at_level(logging.WARNING):
        manager = _manager(resolution=(512, 512), min_bucket_reso=300, max_bucket_reso=1000)
    assert manager.predefined == SD_SCRIPTS_512
    assert "300/1000 are rounded to multiples of bucket_reso_steps (64): 256/1024" in caplog.text
    # a max far above any bucket changes nothing (and the list is built at once, not by stepping to 10**9)
    assert make_bucket_resolutions((512, 512), 256, 10**9, 64) == SD_SCRIPTS_512


@pytest.mark.parametrize(("settings", "message"), [
    ({"bucket_reso_steps": 0}, "bucket_reso_steps must be a positive number of pixels \\(got 0\\)"),
    ({"bucket_reso_steps": -64}, "bucket_reso_steps must be a positive number of pixels \\(got -64\\)"),
    ({"min_bucket_reso": 1024, "max_bucket_reso": 256}, "min_bucket_reso \\(1024\\) is larger than max_bucket_reso"),
    ({"min_bucket_reso": 32}, "min_bucket_reso must be at least bucket_reso_steps \\(64\\), got 32"),
    ({"min_bucket_reso": 0}, "min_bucket_reso must be at least bucket_reso_steps"),
    ({"resolution": (128, 512)}, "resolution 128x512 is below min_bucket_reso \\(256\\); lower min_bucket_reso"),
    ({"resolution": (512, 2048)}, "resolution 512x2048 is above max_bucket_reso \\(1024\\); raise max_bucket_reso"),
    ({"resolution": (512, 2048), "bucket_no_upscale": True}, "resolution 512x2048 is above max_bucket_reso"),
    ({"resolution": (0, 512)}, "resolution must be positive \\(got 0x512\\)"),
])
def test_bucket_settings_that_sd_scripts_refuses_or_that_would_crash_name_the_key(settings, message):
    dataset = DatasetConfig(subsets=[SubsetConfig(image_dir="data/5_x")], **{"resolution": (512, 512), **settings},
                            enable_bucket=True)
    with pytest.raises(ConfigError, match=f"^dataset with image_dir data/5_x: {message}"):
        BucketManager(dataset)


def test_bucket_settings_are_not_checked_when_bucketing_is_off():
    # sd-scripts ignores min/max/steps without enable_bucket; only the resolution is used
    manager = BucketManager(DatasetConfig(enable_bucket=False, resolution=(128, 128), bucket_reso_steps=0,
                                          min_bucket_reso=512, max_bucket_reso=64))
    assert manager.select(256, 128) == BucketChoice((128, 128), (256, 128), 1.0 - 2.0)
    with pytest.raises(ConfigError, match="resolution must be positive"):
        BucketManager(DatasetConfig(enable_bucket=False, resolution=(128, -1)))


def test_train_data_dir_is_scanned_one_level_deep_as_sd_scripts_does(tmp_path):
    from lycolab.config import load_config

    write_images(tmp_path / "data" / "5_cat", [(64, 64)])
    write_images(tmp_path / "data" / "5_cat" / "3_nested", [(64, 64)])  # sd-scripts never looks here
    config = load_config(overrides={"train_data_dir": str(tmp_path / "data"), "resolution": "64"})
    assert [Path(subset.image_dir).name for dataset in config.datasets for subset in dataset.subsets] == ["5_cat"]
