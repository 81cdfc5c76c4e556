"""Property-based: any caption file and any caption settings give a caption (never an error) that keeps its fixed
tags in place and encodes with the real tiny CLIP tokenizer and text encoder within the model's token positions."""

from __future__ import annotations

import dataclasses
import random
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from lycolab.config import DatasetConfig, SubsetConfig
from lycolab.data.captions import process_caption, split_tags
from lycolab.data.dataset import BucketedDataset
from lycolab.data.scan import read_caption
from lycolab.models.text import encode_prompts, tokenize
from lycolab.models.tiny import build_tiny_text_encoder, build_tiny_tokenizer

SEPARATORS = (", ", ",", " , ", ",,", "|||", " ||| ", "\r\n", "\n", "\t", " ", "、", "\x00", "\u2028")
KEEP_SEPARATORS = ("", "|||", "|", "||", ",", " ", "sks", "\n")
TAG_CHARACTERS = st.characters(codec="utf-8") | st.sampled_from(", |\r\n\x00\ufeff\ufffd猫🙂")


@pytest.fixture(scope="module")
def text_model():
    """The real tiny CLIP tokenizer and text encoder (77 positions), built once: they are only read."""
    tokenizer = build_tiny_tokenizer()
    return tokenizer, build_tiny_text_encoder(len(tokenizer)).eval()


@st.composite
def caption_files(draw) -> bytes:
    """Bytes of a caption file: random bytes, or tags with odd separators in a right or wrong encoding."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    tags = draw(st.lists(st.text(TAG_CHARACTERS, max_size=12), max_size=40))
    text = "".join(tag + draw(st.sampled_from(SEPARATORS)) for tag in tags)
    text = draw(st.sampled_from(["", "\ufeff"])) + text
    return text.encode(draw(st.sampled_from(["utf-8", "utf-16", "utf-16-le"])), errors="replace")


subsets = st.builds(
    SubsetConfig, image_dir=st.just("."), caption_extension=st.just(".txt"), shuffle_caption=st.booleans(),
    keep_tokens=st.integers(0, 60), keep_tokens_separator=st.sampled_from(KEEP_SEPARATORS),
    caption_prefix=st.none() | st.text(TAG_CHARACTERS, max_size=10),
    caption_suffix=st.none() | st.text(TAG_CHARACTERS, max_size=10),
    caption_dropout_rate=st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0),
    caption_dropout_every_n_epochs=st.integers(0, 3),
    caption_tag_dropout_rate=st.sampled_from([0.0]) | st.floats(0.0, 1.0),
)


def unshuffled(caption: str, subset: SubsetConfig) -> str:
    """The caption with prefix and suffix, before any shuffling or dropout: what the fixed tags are taken from."""
    plain = dataclasses.replace(subset, shuffle_caption=False, caption_tag_dropout_rate=0.0, caption_dropout_rate=0.0,
                                caption_dropout_every_n_epochs=0)
    return process_caption(caption, plain, random.Random(0))


def check_fixed_tags_stay_in_place(result: str, plain: str, subset: SubsetConfig) -> None:
    """keep_tokens (or the part before keep_tokens_separator, and after a second one) never move or drop."""
    separator = subset.keep_tokens_separator
    if separator and separator in plain:
        head, rest = plain.split(separator, 1)
        middle, tail = rest.split(separator, 1) if separator in rest else (rest, "")
        first, movable, last = split_tags(head), split_tags(middle), split_tags(tail)
    else:  # keep_tokens counts empty tags too, as sd-scripts does ("a,,b" has three)
        tags = [tag.strip() for tag in plain.strip().split(",")]
        first, movable, last = ([tag for tag in part if tag] for part in (tags[: subset.keep_tokens],
                                                                          tags[subset.keep_tokens :], []))
    result_tags = split_tags(result)
    assert result_tags[: len(first)] == first
    assert result_tags[len(result_tags) - len(last) :] == last
    middle_tags = Counter(result_tags[len(first) : len(result_tags) - len(last)])
    assert middle_tags <= Counter(movable)  # shuffled, some perhaps dropped, nothing invented
    if subset.caption_tag_dropout_rate == 0:
        assert middle_tags == Counter(movable)


def check_encodes_within_the_token_positions(text_model, captions: list[str], max_token_length: int | None) -> None:
    """Truncated to max_token_length (75/150/225) + BOS/EOS, then encoded in 77-token chunks without an error."""
    tokenizer, text_encoder = text_model
    length = (max_token_length or 75) + 2
    ids = tokenize(tokenizer, captions, max_token_length)
    assert ids.shape == (len(captions), length) and ids.max() < len(tokenizer)
    assert (ids[:, 0] == tokenizer.bos_token_id).all() and (ids[:, -1] == tokenizer.eos_token_id).all()
    with torch.no_grad():
        states = encode_prompts(text_encoder, tokenizer, captions, clip_skip=2, max_token_length=max_token_length)
    assert states.shape == (len(captions), length, text_encoder.config.hidden_size) and torch.isfinite(states).all()


@given(data=caption_files(), subset=subsets, seed=st.integers(0, 2**32 - 1),
       max_token_length=st.sampled_from([None, 150, 225]))
def test_any_caption_file_and_settings_give_a_caption_that_keeps_its_fixed_tags_and_encodes(
        text_model, data, subset, seed, max_token_length):
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "image.txt").write_bytes(data)
        caption = read_caption(Path(directory) / "image.png", subset)
    assert isinstance(caption, str) and len(caption.splitlines()) <= 1
    assert "\x00" not in caption and not caption.startswith("\ufeff") and caption == caption.strip()
    plain = unshuffled(caption, subset)
    rng = random.Random(seed)
    results = []
    for epoch in (1, 2, 3):
        result = process_caption(caption, subset, rng, epoch)
        results.append(result)
        every = subset.caption_dropout_every_n_epochs
        if (every and epoch % every == 0) or subset.caption_dropout_rate == 1.0:
            assert result == ""
        elif result or subset.caption_dropout_rate == 0:  # else an empty result may be the random caption dropout
            if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0:
                check_fixed_tags_stay_in_place(result, plain, subset)
            else:  # the tags are not split at all (a keep_tokens_separator stays in the text), as in sd-scripts
                assert result == plain
    check_encodes_within_the_token_positions(text_model, results, max_token_length)  # one batch, as training


def test_ten_thousand_tags_keep_their_first_tags_and_are_truncated_to_the_token_length(text_model, tmp_path):
    folder = tmp_path / "1_many"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    tags = ["sks", "blue hair", "solo"] + [f"tag {index}" for index in range(9997)]
    (folder / "a.txt").write_bytes(b"\xef\xbb\xbf" + ", ".join(tags).encode() + b"\r\nsecond line\r\n")
    subset = SubsetConfig(image_dir=str(folder), caption_extension=".txt", shuffle_caption=True, keep_tokens=3,
                          caption_tag_dropout_rate=0.1)
    dataset = BucketedDataset([DatasetConfig(subsets=[subset], resolution=(64, 64))], 1)
    assert dataset.items[0].record.caption == ", ".join(tags)
    result = dataset.caption(0, random.Random(1), epoch=1)
    assert split_tags(result)[:3] == tags[:3] and 8000 < len(split_tags(result)) < len(tags)
    assert split_tags(result)[3:] != tags[3 : len(split_tags(result))]  # the rest is shuffled
    check_encodes_within_the_token_positions(text_model, [result], 225)


def test_keep_tokens_larger_than_the_tag_count_keeps_every_tag_in_place():
    subset = SubsetConfig(image_dir=".", shuffle_caption=True, keep_tokens=10, caption_tag_dropout_rate=0.9)
    assert process_caption("b, a,, c ,", subset, random.Random(0)) == "b, a, , c, "  # sd-scripts keeps empty tags


def test_a_second_keep_tokens_separator_keeps_the_tags_after_it_last_as_sd_scripts_does():
    subset = SubsetConfig(image_dir=".", shuffle_caption=True, keep_tokens_separator="|||")
    results = {process_caption("sks, girl ||| a, b, c, d ||| masterpiece, best", subset, random.Random(seed))
               for seed in range(20)}
    assert len(results) > 1
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["sks", "girl"] and tags[-2:] == ["masterpiece", "best"]
        assert sorted(tags[2:-2]) == ["a", "b", "c", "d"]
