"""Tag tools for comma-separated captions: remove undesired tags, put a trigger word first, count tags, edit a
whole folder (training writes the ``ss_tag_frequency`` metadata from the same captions).

A tag is compared after trimming and with underscores and spaces treated alike (boorus write ``long_hair``, WD14
with ``underscores → spaces`` writes ``long hair``). Undesired tags may use shell wildcards: ``*hair`` removes every
hair colour, ``1girl`` only itself.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from lycolab.data.captions import split_tags
from lycolab.data.scan import IMAGE_EXTENSIONS, caption_suffix


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def normalise(tag: str) -> str:
    return " ".join(tag.replace("_", " ").lower().split())


def dedupe(tags: Iterable[str]) -> list[str]:
    """Each tag once, first occurrence kept (``long_hair`` and ``long hair`` are the same tag)."""
    seen, kept = set(), []
    for tag in tags:
        key = normalise(tag)
        if key not in seen:
            seen.add(key)
            kept.append(tag)
    return kept


def remove_tags(tags: Iterable[str], undesired: Iterable[str]) -> list[str]:
    """Tags without the undesired ones (exact, or shell wildcards such as ``*_hair`` / ``red *``)."""
    patterns = [normalise(pattern) for pattern in undesired if pattern.strip()]
    return [tag for tag in tags if not any(fnmatch.fnmatchcase(normalise(tag), pattern) for pattern in patterns)]


def with_trigger_word(tags: Iterable[str], trigger_word: str | None) -> list[str]:
    """The trigger word first, exactly once (an existing copy elsewhere is moved, not repeated)."""
    tags = list(tags)
    if not trigger_word or not trigger_word.strip():
        return tags
    trigger = trigger_word.strip()
    return [trigger] + [tag for tag in tags if normalise(tag) != normalise(trigger)]


def clean_caption(caption: str, undesired: Iterable[str] = (), trigger_word: str | None = None) -> str:
    """The caption after dedupe, undesired-tag removal and the trigger word (in that order)."""
    return join_tags(with_trigger_word(remove_tags(dedupe(split_tags(caption)), undesired), trigger_word))


def caption_files(folder: str | Path, caption_extension: str = ".txt") -> list[Path]:
    """The caption file of every image in ``folder`` (existing or not), sorted."""
    images = sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
    return [image.with_suffix(caption_suffix(caption_extension)) for image in images]


def tag_frequency(folder: str | Path, caption_extension: str = ".txt") -> Counter:
    """How many captions in the folder hold each tag (the notebook shows the top ones)."""
    counts: Counter = Counter()
    for path in caption_files(folder, caption_extension):
        if path.is_file():
            counts.update(dedupe(split_tags(path.read_text(encoding="utf-8"))))
    return counts


def edit_folder(folder: str | Path, caption_extension: str = ".txt", remove: Iterable[str] = (),
                replace: dict[str, str] | None = None, add: Iterable[str] = (), trigger_word: str | None = None
                ) -> int:
    """Apply one edit to every caption file of the folder's images; returns how many files changed.

    ``replace`` maps a tag (exact, underscores ≈ spaces) to its new text; ``add`` appends tags not yet present.
    """
    replacements = {normalise(old): new for old, new in (replace or {}).items()}
    remove, add = list(remove), list(add)
    changed = 0
    for path in caption_files(folder, caption_extension):
        if not path.is_file():
            continue
        original = path.read_text(encoding="utf-8").strip()
        tags = [replacements.get(normalise(tag), tag) for tag in split_tags(original)]
        tags = dedupe(remove_tags(tags + add, remove))
        updated = join_tags(with_trigger_word(tags, trigger_word))
        if updated != original:
            path.write_text(updated + "\n", encoding="utf-8")
            changed += 1
    return changed
