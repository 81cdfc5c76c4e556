"""sd-scripts' caption options as its ``BaseDataset.process_caption`` applies them: prefix/suffix, caption dropout,
wildcards, keep_tokens and keep_tokens_separator, token warmup, shuffle, tag dropout, secondary_separator and
caption_separator; then a training run with all of them set in a dataset_config, and a resume from its middle that
ends with the same weights."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path

import pytest
import tomli_w
import torch
from conftest import SHAPE_IMAGES, make_shapes_dataset
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from lycolab.config import DatasetConfig, SubsetConfig, load_config
from lycolab.data.captions import process_caption, token_warmup_steps, warmup_tag_count
from lycolab.data.dataset import BucketedDataset
from lycolab.data.scan import read_caption
from lycolab.training import train

WORDS = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=6)
TAGS = st.lists(WORDS, max_size=8)
SEEDS = st.integers(0, 2**32 - 1)


def _subset(**values) -> SubsetConfig:
    return SubsetConfig(image_dir=".", **values)


def _tags(caption: str) -> list[str]:
    return caption.split(", ") if caption else []


# ---------------------------------------------------------------------------------------------- prefix, dropout


def test_prefix_and_suffix_are_joined_with_a_space_before_the_tags_are_split():
    subset = _subset(caption_prefix="sks,", caption_suffix=", masterpiece")
    assert process_caption("a, b", subset, random.Random(0)) == "sks, a, b , masterpiece"
    assert process_caption("", _subset(caption_prefix="sks"), random.Random(0)) == "sks "  # as sd-scripts writes it
    shuffled = dataclasses.replace(subset, shuffle_caption=True, keep_tokens=1)
    results = {process_caption("a, b, c, d", shuffled, random.Random(seed)) for seed in range(20)}
    assert len(results) > 1 and all(result.startswith("sks, ") for result in results)  # the prefix is a tag


def test_caption_dropout_comes_first_and_every_n_epochs_drops_those_epochs():
    subset = _subset(caption_dropout_rate=0.5, shuffle_caption=True, enable_wildcard=True)
    for seed in range(40):
        dropped = random.Random(seed).random() < 0.5  # its draw is the first one
        assert (process_caption("a, {b|c}, d", subset, random.Random(seed)) == "") == dropped
    every = _subset(caption_dropout_every_n_epochs=2, caption_prefix="sks")
    assert [process_caption("a", every, random.Random(0), epoch) for epoch in range(1, 6)] == [
        "sks a", "", "sks a", "", "sks a"]
    assert process_caption("a", _subset(caption_dropout_rate=1.0), random.Random(0)) == ""


# ---------------------------------------------------------------------------------------------------- wildcards


def test_without_enable_wildcard_only_the_first_line_is_used_and_braces_stay():
    assert process_caption("a, {b|c}\nsecond, line", _subset(), random.Random(0)) == "a, {b|c}"


@given(options=st.lists(WORDS, min_size=1, max_size=5), before=TAGS, after=TAGS, seed=SEEDS)
def test_a_wildcard_becomes_one_of_its_options(options, before, after, seed):
    caption = ", ".join([*before, "{" + "|".join(options) + "}", *after])
    result = process_caption(caption, _subset(enable_wildcard=True), random.Random(seed))
    assert result in {", ".join([*before, option, *after]) for option in options}


def test_wildcards_choose_one_line_then_each_option_and_keep_escaped_braces():
    subset = _subset(enable_wildcard=True)
    caption = "sks, {red|blue} {circle|square}\nsks, photo of {{literal}}"
    results = Counter(process_caption(caption, subset, random.Random(seed)) for seed in range(200))
    assert set(results) == {"sks, red circle", "sks, red square", "sks, blue circle", "sks, blue square",
                            "sks, photo of {literal}"}
    assert process_caption("{{a|b}}", subset, random.Random(0)) == "{a|b}"
    # an option may hold several tags: they are split after the choice, and shuffle like any others
    shuffled = dataclasses.replace(subset, shuffle_caption=True, keep_tokens=1)
    for seed in range(20):
        tags = _tags(process_caption("sks, {a, b|c}, d", shuffled, random.Random(seed)))
        assert tags[0] == "sks" and sorted(tags[1:]) in (["a", "b", "d"], ["c", "d"])


def test_with_several_lines_the_prefix_is_on_the_first_and_the_suffix_on_the_last_as_in_sd_scripts():
    subset = _subset(enable_wildcard=True, caption_prefix="pre", caption_suffix="post")  # added before the choice
    results = {process_caption("one\ntwo\nthree", subset, random.Random(seed)) for seed in range(50)}
    assert results == {"pre one", "two", "three post"}


def test_with_enable_wildcard_the_caption_file_keeps_every_non_blank_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfsks, {red|blue}\r\n\r\n  second line  \rthird\n\n")
    wildcard = SubsetConfig(image_dir=str(tmp_path), caption_extension=".txt", enable_wildcard=True)
    assert read_caption(tmp_path / "a.png", wildcard) == "sks, {red|blue}\nsecond line\nthird"
    plain = dataclasses.replace(wildcard, enable_wildcard=False)
    assert read_caption(tmp_path / "a.png", plain) == "sks, {red|blue}"


# ------------------------------------------------------------------------------------- keep_tokens, shuffle, drop


@given(tags=TAGS, keep=st.integers(0, 10), rate=st.sampled_from([0.0, 0.3]), seed=SEEDS)
def test_keep_tokens_stay_first_and_shuffling_loses_or_repeats_no_tag(tags, keep, rate, seed):
    subset = _subset(shuffle_caption=True, keep_tokens=keep, caption_tag_dropout_rate=rate)
    result = _tags(process_caption(", ".join(tags), subset, random.Random(seed)))
    assert result[:keep] == tags[:keep]
    if rate == 0:
        assert Counter(result[keep:]) == Counter(tags[keep:])
    else:
        assert Counter(result[keep:]) <= Counter(tags[keep:])


@given(head=TAGS, middle=TAGS, tail=TAGS, rate=st.sampled_from([0.0, 0.5]), seed=SEEDS)
def test_keep_tokens_separator_fixes_the_head_and_after_a_second_one_the_tail(head, middle, tail, rate, seed):
    subset = _subset(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=3, caption_tag_dropout_rate=rate)
    caption = f"{', '.join(head)} ||| {', '.join(middle)} ||| {', '.join(tail)}"
    result = _tags(process_caption(caption, subset, random.Random(seed)))
    assert result[: len(head)] == head and result[len(result) - len(tail) :] == tail
    moved = Counter(result[len(head) : len(result) - len(tail)])
    assert moved == Counter(middle) if rate == 0 else moved <= Counter(middle)


def test_keep_tokens_counts_empty_tags_as_sd_scripts_does():
    subset = _subset(shuffle_caption=True, keep_tokens=2)
    results = {process_caption("a,, b, c, d", subset, random.Random(seed)) for seed in range(20)}
    assert len(results) > 1 and all(result.startswith("a, , ") for result in results)
    separated = _subset(shuffle_caption=True, keep_tokens_separator="|||")  # here empty tags are dropped
    assert process_caption("a,, ||| b ||| c,", separated, random.Random(0)) == "a, b, c"


def test_without_shuffle_warmup_or_tag_dropout_the_tags_are_not_touched():
    assert process_caption("b,a ||| c", _subset(keep_tokens_separator="|||", keep_tokens=1), random.Random(0)) == (
        "b,a ||| c")


def test_tag_dropout_keeps_the_order_without_shuffle_and_never_drops_fixed_tags():
    subset = _subset(keep_tokens=1, caption_tag_dropout_rate=0.5)
    tags = ["sks", *"abcdefgh"]
    results = [_tags(process_caption(", ".join(tags), subset, random.Random(seed))) for seed in range(30)]
    assert all(result[0] == "sks" and result == [tag for tag in tags if tag in result] for result in results)
    assert len({len(result) for result in results}) > 1
    everything = dataclasses.replace(subset, caption_tag_dropout_rate=1.0, shuffle_caption=True)
    assert process_caption(", ".join(tags), everything, random.Random(0)) == "sks"


# --------------------------------------------------------------------------------------------------- separators


@given(groups=st.lists(st.lists(WORDS, min_size=1, max_size=3), min_size=1, max_size=6),
       rate=st.sampled_from([0.0, 0.4]), seed=SEEDS)
def test_secondary_separated_tags_move_and_drop_as_one_then_use_the_caption_separator(groups, rate, seed):
    subset = _subset(shuffle_caption=True, secondary_separator=";;;", caption_tag_dropout_rate=rate)
    caption = ", ".join(";;;".join(group) for group in groups)
    result = _tags(process_caption(caption, subset, random.Random(seed)))
    written = Counter(",".join(group) for group in groups)
    assert Counter(result) == written if rate == 0 else Counter(result) <= written


def test_secondary_separator_is_replaced_even_without_shuffle():
    assert process_caption("a;;;b, c", _subset(secondary_separator=";;;"), random.Random(0)) == "a,b, c"


def test_caption_separator_splits_the_tags_and_they_are_joined_with_a_comma_as_in_sd_scripts():
    subset = _subset(shuffle_caption=True, keep_tokens=1, caption_separator=";")
    results = {process_caption("sks; a; b c; d", subset, random.Random(seed)) for seed in range(20)}
    assert len(results) > 1
    for result in results:
        assert result.startswith("sks, ") and sorted(result[len("sks, "):].split(", ")) == ["a", "b c", "d"]
    assert process_caption("a, b; c", subset, random.Random(0)) == "a, b, c"  # "a, b" was one tag
    assert process_caption("sks; a", _subset(caption_separator=";"), random.Random(0)) == "sks; a"


# ------------------------------------------------------------------------------------------------- token warmup


def test_token_warmup_counts_from_its_minimum_to_every_tag_at_the_warmup_step():
    subset = _subset(token_warmup_min=1, token_warmup_step=4)
    assert [warmup_tag_count(subset, 7, step, 4) for step in range(6)] == [1, 2, 4, 5, 7, 7]  # 1 + floor(step * 6/4)
    warming = dataclasses.replace(subset, keep_tokens=1)
    caption = "sks, a, b, c, d, e, f, g"
    assert [process_caption(caption, warming, random.Random(0), step=step) for step in (0, 1, 2, 4)] == [
        "sks, a", "sks, a, b", "sks, a, b, c, d", caption]
    tail = _subset(token_warmup_min=1, token_warmup_step=10, keep_tokens_separator="|||")
    assert process_caption("sks ||| a, b, c ||| best", tail, random.Random(0), step=0) == "sks, a, best"


@given(tag_count=st.integers(0, 30), minimum=st.integers(0, 5), warmup=st.integers(1, 50))
def test_token_warmup_grows_and_reaches_all_tags(tag_count, minimum, warmup):
    subset = _subset(token_warmup_min=minimum, token_warmup_step=warmup)
    tags = list(range(tag_count))
    counts = [len(tags[: warmup_tag_count(subset, tag_count, step, warmup)]) for step in range(warmup + 2)]
    assert counts == sorted(counts) and counts[warmup:] == [tag_count, tag_count]
    assert counts[0] == min(minimum, tag_count)


def test_a_token_warmup_step_below_one_is_that_fraction_of_max_train_steps():
    assert token_warmup_steps(_subset(token_warmup_step=0.5), 20) == 10
    assert token_warmup_steps(_subset(token_warmup_step=0.25), 10) == 2  # rounded down
    assert token_warmup_steps(_subset(token_warmup_step=3), 10) == 3
    assert token_warmup_steps(_subset(token_warmup_step=0.5), 0) == 0  # no step count known: no warmup
    caption = "a, b, c, d, e, f, g, h, i, j, k"
    fraction, steps = _subset(token_warmup_step=0.5), _subset(token_warmup_step=10)
    for step in range(12):
        assert process_caption(caption, fraction, random.Random(0), step=step, max_train_steps=20) == (
            process_caption(caption, steps, random.Random(0), step=step))


# ------------------------------------------------------------------------------------------------ all together

ALL_OPTIONS = dict(
    caption_prefix="photo,", caption_suffix="|||, best quality", shuffle_caption=True, keep_tokens_separator="|||",
    secondary_separator=";;", enable_wildcard=True, caption_dropout_rate=0.2, caption_dropout_every_n_epochs=2,
    caption_tag_dropout_rate=0.2, token_warmup_min=2, token_warmup_step=0.5,
)


@given(seed=SEEDS, epoch=st.integers(1, 5), step=st.integers(0, 30))
def test_every_option_at_once_is_reproducible_from_the_items_generator(seed, epoch, step):
    subset = _subset(**ALL_OPTIONS)
    caption = "sks ||| {red|blue} circle, plain;;background, {small|big}\nsks ||| square, centered;;shape"
    first = process_caption(caption, subset, random.Random(seed), epoch, step, 20)
    assert first == process_caption(caption, subset, random.Random(seed), epoch, step, 20)
    if first:
        _check_all_options_caption(first)


def _check_all_options_caption(caption: str) -> None:
    """A caption made with ALL_OPTIONS from the two-line captions below: sd-scripts adds the prefix before the
    first line and the suffix after the last before choosing a line."""
    tags = _tags(caption)
    if tags[0] == "photo":
        assert tags[1] == "sks" and "best quality" not in tags
    else:
        assert tags[0] == "sks" and tags[-1] == "best quality"
    assert "{" not in caption and "|" not in caption and ";;" not in caption


def test_the_dataset_passes_step_and_max_train_steps_to_the_caption(tmp_path):
    make_shapes_dataset(tmp_path)
    subset = SubsetConfig(image_dir=str(tmp_path / "2_shapes"), caption_extension=".txt", keep_tokens=1,
                          token_warmup_min=1, token_warmup_step=0.5)
    dataset = BucketedDataset([DatasetConfig(subsets=[subset], resolution=(64, 64))], 1)
    shape, color, background = SHAPE_IMAGES[0]
    assert dataset.caption(0, random.Random(0), 1, 0, 8) == f"sks, {color} {shape}"
    assert dataset.caption(0, random.Random(0), 1, 4, 8) == f"sks, {color} {shape}, {background} background"


def _write_options_dataset(root: Path) -> Path:
    """The shape images with two-line wildcard captions, and a dataset_config setting every caption option."""
    folder = make_shapes_dataset(root / "train") / "2_shapes"
    for index, (shape, color, background) in enumerate(SHAPE_IMAGES):
        (folder / f"{index}.txt").write_text(
            f"sks ||| {{{color}|colored}} {shape}, {background};;background, simple\n"
            f"sks ||| {color} {shape}, {{plain|flat}} {background}", encoding="utf-8")
    document = {"general": {"caption_extension": ".txt", **ALL_OPTIONS},
                "datasets": [{"resolution": 64, "batch_size": 2, "subsets": [{"image_dir": str(folder),
                                                                              "num_repeats": 2}]}]}
    path = root / "dataset_config.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


def _options_config(model: Path, dataset_config: Path, out: Path, **extra):
    return load_config(dataset_config=dataset_config, overrides={
        "pretrained_model_name_or_path": str(model), "network_module": "lycoris.kohya",
        "network_args": ["algo=locon", "conv_dim=2", "conv_alpha=1"], "network_dim": 4, "network_alpha": 2,
        "learning_rate": 1e-3, "optimizer_type": "AdamW", "max_train_epochs": 2, "seed": 5, "output_dir": str(out),
        "output_name": "captions", "save_precision": "float", "save_state": True, "save_every_n_steps": 3, **extra})


def test_a_run_with_every_caption_option_trains_and_resumes_to_the_same_weights(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    dataset_config = _write_options_dataset(tmp_path)
    # captions are recorded in this process (no loader workers); the resumed run reads with workers, and must match
    config = _options_config(tiny_model_dir, dataset_config, tmp_path / "full", max_data_loader_n_workers=0)
    [subset] = config.datasets[0].subsets
    assert {key: getattr(subset, key) for key in ALL_OPTIONS} == ALL_OPTIONS
    seen: list[tuple[int, int, int, str]] = []
    original = BucketedDataset.caption

    def recording(self, index, rng, epoch, step=0, max_train_steps=0):
        caption = original(self, index, rng, epoch, step, max_train_steps)
        seen.append((epoch, step, max_train_steps, caption))
        return caption

    monkeypatch.setattr(BucketedDataset, "caption", recording)
    reference = train(config, progress=False)
    assert reference.total_steps == 8  # 8 images with repeats / batch 2, 2 epochs
    assert {step for _, step, _, _ in seen} == set(range(8)) and {total for _, _, total, _ in seen} == {8}
    assert all(caption == "" for epoch, _, _, caption in seen if epoch == 2)  # caption_dropout_every_n_epochs
    shown = [caption for _, _, _, caption in seen if caption]
    assert shown
    for caption in shown:
        _check_all_options_caption(caption)
    warm = [len(_tags(caption)) for _, step, _, caption in seen if caption and step == 0]
    assert warm and all(count <= 2 + 2 + 1 for count in warm)  # head (2) + token_warmup_min (2) + tail (1)

    monkeypatch.setattr(BucketedDataset, "caption", original)
    state = tmp_path / "full" / "captions-step00000003-state"  # token warmup (to step 4) still growing
    resumed = train(_options_config(tiny_model_dir, dataset_config, tmp_path / "resumed", resume=str(state)),
                    progress=False)
    assert resumed.total_steps == 8
    first, second = load_file(str(reference.saved_files[-1])), load_file(str(resumed.saved_files[-1]))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert resumed.history.losses == pytest.approx(reference.history.losses, rel=0, abs=0)
