"""Caption processing per step: prefix/suffix, shuffle with keep_tokens, tag and caption dropout (sd-scripts rules)."""

from __future__ import annotations

import random

from lycolab.config import SubsetConfig


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def process_caption(caption: str, subset: SubsetConfig, rng: random.Random, epoch: int = 1) -> str:
    """The caption the model sees this time: the first ``keep_tokens`` tags stay in place, the rest may shuffle.

    With ``keep_tokens_separator`` (e.g. ``|||``) the tags before it stay in place instead, and — as in sd-scripts —
    tags after a second separator stay at the end. Any text gives a caption (never an error); its length in tokens
    is bounded later, where it is tokenized with truncation (``lycolab.models.text.tokenize``).
    """
    if subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate:
        return ""
    every = subset.caption_dropout_every_n_epochs
    if every > 0 and epoch % every == 0:
        return ""
    if subset.caption_prefix:
        caption = f"{subset.caption_prefix} {caption}".strip()
    if subset.caption_suffix:
        caption = f"{caption} {subset.caption_suffix}".strip()
    if not (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0):
        return caption
    fixed_tags, flexible_tags, fixed_suffix_tags = _split_fixed(caption, subset)
    if subset.shuffle_caption:
        rng.shuffle(flexible_tags)
    if subset.caption_tag_dropout_rate > 0:
        flexible_tags = [tag for tag in flexible_tags if rng.random() >= subset.caption_tag_dropout_rate]
    return ", ".join(fixed_tags + flexible_tags + fixed_suffix_tags)


def _split_fixed(caption: str, subset: SubsetConfig) -> tuple[list[str], list[str], list[str]]:
    """(tags kept first, tags that may move or drop, tags kept last) by keep_tokens_separator or keep_tokens."""
    separator = subset.keep_tokens_separator
    if separator and separator in caption:
        fixed_part, flexible_part = caption.split(separator, 1)
        suffix_part = ""
        if separator in flexible_part:
            flexible_part, suffix_part = flexible_part.split(separator, 1)
        return split_tags(fixed_part), split_tags(flexible_part), split_tags(suffix_part)
    tags = split_tags(caption)
    keep = max(subset.keep_tokens, 0)
    return tags[:keep], tags[keep:], []
