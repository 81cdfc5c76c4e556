"""The caption the model sees at one step, made as sd-scripts' ``BaseDataset.process_caption`` makes it.

Its order: caption_prefix/suffix; caption dropout (rate, every N epochs); one line and ``{a|b}`` wildcards with
``enable_wildcard`` (else the first line); then, when shuffling, token warmup or tag dropout is on, the tags split by
``caption_separator`` into a fixed head (``keep_tokens``, or the part before ``keep_tokens_separator``), a movable
middle and a fixed tail (after a second ``keep_tokens_separator``); the middle is cut to the warmup's length, shuffled,
tag-dropped, and everything joined with ", "; last, ``secondary_separator`` becomes ``caption_separator`` (so tags
joined by it move and drop as one). Random draws come in that order from the item's own generator
(:mod:`lycolab.training.seeds`), where sd-scripts uses the global ``random`` module.
"""

from __future__ import annotations

import math
import random
import re

from lycolab.config import SubsetConfig

_WILDCARD = re.compile(r"\{([^}]+)\}")


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def process_caption(caption: str, subset: SubsetConfig, rng: random.Random, epoch: int = 1, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """The caption for this use of the image at ``epoch`` (1-based) after ``step`` optimizer steps.

    Any text gives a caption (never an error); its length in tokens is bounded later, where it is tokenized with
    truncation (``lycolab.models.text.tokenize``). Without shuffling, token warmup or tag dropout the tag part is left
    alone, as in sd-scripts (a ``keep_tokens_separator`` then stays in the text).
    """
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    caption = choose_wildcards(caption, rng) if subset.enable_wildcard else caption.split("\n")[0]
    warmup_steps = token_warmup_steps(subset, max_train_steps)
    if subset.shuffle_caption or warmup_steps > 0 or subset.caption_tag_dropout_rate > 0:
        caption = _arrange_tags(caption, subset, rng, step, warmup_steps)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def choose_wildcards(caption: str, rng: random.Random) -> str:
    """``enable_wildcard``: one random line of a multi-line caption, then each ``{a|b|c}`` replaced by one random
    option, left to right; ``{{`` and ``}}`` stand for literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_mark, close_mark = "⦅", "⦆"  # placeholders for escaped braces, lengthened until the caption has none
    while open_mark in caption or close_mark in caption:
        open_mark += "⦅"
        close_mark += "⦆"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def token_warmup_steps(subset: SubsetConfig, max_train_steps: int) -> float:
    """The step at which token warmup reaches all tags: ``token_warmup_step``, or below 1 that fraction of
    ``max_train_steps`` rounded down (sd-scripts overwrites the subset's value with it on first use); 0 is off."""
    if subset.token_warmup_step < 1:
        return math.floor(subset.token_warmup_step * max_train_steps)
    return subset.token_warmup_step


def warmup_tag_count(subset: SubsetConfig, tag_count: int, step: int, warmup_steps: float) -> int:
    """How many movable tags token warmup keeps after ``step`` steps: ``token_warmup_min`` at step 0, growing
    linearly (rounded down) to all of them at ``warmup_steps``."""
    if warmup_steps and step < warmup_steps:
        return math.floor(step * ((tag_count - subset.token_warmup_min) / warmup_steps)) + subset.token_warmup_min
    return tag_count


def _arrange_tags(caption: str, subset: SubsetConfig, rng: random.Random, step: int, warmup_steps: float) -> str:
    """Fixed head, then the movable tags cut by token warmup, shuffled and tag-dropped, then the fixed tail."""
    fixed_tags, flexible_tags, fixed_suffix_tags = split_fixed(caption, subset)
    flexible_tags = flexible_tags[: warmup_tag_count(subset, len(flexible_tags), step, warmup_steps)]
    if subset.shuffle_caption:
        rng.shuffle(flexible_tags)
    if subset.caption_tag_dropout_rate > 0:
        flexible_tags = [tag for tag in flexible_tags if rng.random() >= subset.caption_tag_dropout_rate]
    return ", ".join(fixed_tags + flexible_tags + fixed_suffix_tags)


def split_fixed(caption: str, subset: SubsetConfig) -> tuple[list[str], list[str], list[str]]:
    """(tags kept first, tags that may move or drop, tags kept last), split by ``caption_separator``.

    With ``keep_tokens_separator`` in the caption: the parts before it, between it and a second one, and after the
    second, empty tags dropped. Otherwise the first ``keep_tokens`` tags are fixed; here sd-scripts keeps empty tags
    (``"a,,b"`` has three), and so do we, so that keep_tokens counts the same tags.
    """
    separator, tag_separator = subset.keep_tokens_separator, subset.caption_separator
    if separator and separator in caption:
        fixed_part, flexible_part = caption.split(separator, 1)
        suffix_part = ""
        if separator in flexible_part:
            flexible_part, suffix_part = flexible_part.split(separator, 1)
        return (_nonempty_tags(fixed_part, tag_separator), _nonempty_tags(flexible_part, tag_separator),
                _nonempty_tags(suffix_part, tag_separator))
    tags = [tag.strip() for tag in caption.strip().split(tag_separator)]
    keep = max(subset.keep_tokens, 0)
    return tags[:keep], tags[keep:], []


def _nonempty_tags(text: str, tag_separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(tag_separator) if tag.strip()]
