import logging
import random

from conftest import write_images

from lycolab.config import DatasetConfig, SubsetConfig
from lycolab.data import BucketedDataset, BucketManager, discover_subsets, make_bucket_resolutions, process_caption
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
    assert parse_repeat_folder("3_my_char") == (3, "my char")
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
