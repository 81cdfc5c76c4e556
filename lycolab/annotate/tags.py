"""Tag tools for comma-separated captions: remove undesired tags, put a trigger word first, replace and add tags,
find captions holding a tag, count tags, edit a whole folder (training writes the ``ss_tag_frequency`` metadata
from the same captions).

A tag is compared after trimming, ignoring case and with underscores and spaces treated alike (boorus write
``long_hair``, WD14 with ``underscores → spaces`` writes ``long hair``). Undesired tags and searches may use shell
wildcards: ``*hair`` matches every hair colour, ``1girl`` only itself. Every edit keeps the remaining tags in their
order and never leaves a tag twice.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from lycolab.annotate.manifest import CaptionManifest, read_caption_text, write_caption
from lycolab.data.captions import split_tags
from lycolab.data.scan import IMAGE_EXTENSIONS, caption_suffix

__all__ = ["split_tags", "join_tags", "normalise", "dedupe", "remove_tags", "with_trigger_word", "append_tags",
           "replace_tags", "parse_replacements", "edit_tag_list", "clean_caption", "has_tags", "caption_files",
           "tag_frequency", "edit_captions", "edit_folder"]


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def normalise(tag: str) -> str:
    return " ".join(tag.replace("_", " ").lower().split())


def dedupe(tags: Iterable[str]) -> list[str]:
    """Each tag once, first occurrence kept (``long_hair`` and ``long hair`` are the same tag)."""
    seen, kept = set(), []
    for tag in tags:
        key = normalise(tag)
        if key and key not in seen:
            seen.add(key)
            kept.append(tag)
    return kept


def _matches(tag: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(normalise(tag), pattern) for pattern in patterns)


def _patterns(tags: Iterable[str]) -> list[str]:
    return [normalise(pattern) for pattern in tags if normalise(pattern)]


def remove_tags(tags: Iterable[str], undesired: Iterable[str]) -> list[str]:
    """Tags without the undesired ones (exact, or shell wildcards such as ``*_hair`` / ``red *``)."""
    patterns = _patterns(undesired)
    return [tag for tag in tags if not _matches(tag, patterns)]


def _trigger_tags(trigger_word: str | None) -> list[str]:
    """A trigger word may be several tags (``sks, 1girl``): each kept first, in that order."""
    return dedupe(split_tags(trigger_word or ""))


def with_trigger_word(tags: Iterable[str], trigger_word: str | None) -> list[str]:
    """The trigger word first, exactly once (an existing copy elsewhere is moved, not repeated)."""
    tags = list(tags)
    trigger = _trigger_tags(trigger_word)
    if not trigger:
        return tags
    keys = {normalise(tag) for tag in trigger}
    return trigger + [tag for tag in tags if normalise(tag) not in keys]


def _without_old_triggers(tags: list[str], old_trigger_words: Iterable[str], trigger_word: str | None
                          ) -> list[str]:
    """Drop the trigger words of earlier runs (exact tags, no wildcards) unless they are part of the new one."""
    if not _trigger_tags(trigger_word):
        return tags  # no new trigger word: the old one stays where it is
    new = {normalise(tag) for tag in _trigger_tags(trigger_word)}
    old = {normalise(tag) for word in old_trigger_words for tag in _trigger_tags(word)} - new
    return [tag for tag in tags if normalise(tag) not in old]


def append_tags(existing: Iterable[str], new: Iterable[str]) -> list[str]:
    """The existing tags (each once, in their order), then only those new tags not already there."""
    return dedupe([*existing, *new])


def replace_tags(tags: Iterable[str], replacements: dict[str, str] | None) -> list[str]:
    """Each tag that is a key (compared as tags are) becomes its value; an empty value removes the tag and a value
    with commas becomes several tags."""
    table = {normalise(old): new for old, new in (replacements or {}).items() if normalise(old)}
    replaced: list[str] = []
    for tag in tags:
        key = normalise(tag)
        replaced += split_tags(table[key]) if key in table else [tag]
    return replaced


def parse_replacements(text: str) -> dict[str, str]:
    """``"long hair=>very long hair, smile=>"`` → ``{"long hair": "very long hair", "smile": ""}``."""
    replacements = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        if "=>" not in entry:
            raise ValueError(f"replace entry {entry!r} has no '=>'; write old=>new, e.g. long hair=>very long hair")
        old, new = (side.strip() for side in entry.split("=>", 1))
        if not normalise(old):
            raise ValueError(f"replace entry {entry!r} has nothing before '=>'; write old=>new")
        replacements[old] = new
    return replacements


def edit_tag_list(tags: Iterable[str], add: Iterable[str] = (), remove: Iterable[str] = (),
                  replace: dict[str, str] | None = None, trigger_word: str | None = None,
                  old_trigger_words: Iterable[str] = ()) -> list[str]:
    """One edit, in this order: replace, append ``add``, remove (wildcards), each tag once, old trigger words out,
    the trigger word first."""
    edited = replace_tags(tags, replace) + [tag for part in add for tag in split_tags(part)]
    edited = dedupe(remove_tags(edited, remove))
    return with_trigger_word(_without_old_triggers(edited, old_trigger_words, trigger_word), trigger_word)


def clean_caption(caption: str, undesired: Iterable[str] = (), trigger_word: str | None = None,
                  old_trigger_words: Iterable[str] = ()) -> str:
    """The caption after dedupe, undesired-tag removal, old trigger words out and the trigger word first."""
    return join_tags(edit_tag_list(split_tags(caption), remove=undesired, trigger_word=trigger_word,
                                   old_trigger_words=old_trigger_words))


def has_tags(caption: str, wanted: Iterable[str]) -> bool:
    """Whether the caption holds every wanted tag (each exact or a wildcard pattern)."""
    patterns, tags = _patterns(wanted), split_tags(caption)
    return bool(patterns) and all(any(fnmatch.fnmatchcase(normalise(tag), pattern) for tag in tags)
                                  for pattern in patterns)


def caption_files(folder: str | Path, caption_extension: str = ".txt") -> list[Path]:
    """The caption file of every image in ``folder`` (existing or not), sorted."""
    images = sorted(path for path in Path(folder).iterdir()
                    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)
    return [image.with_suffix(caption_suffix(caption_extension)) for image in images]


def tag_frequency(folder: str | Path, caption_extension: str = ".txt") -> Counter:
    """How many captions in the folder hold each tag (the notebook shows the top ones)."""
    counts: Counter = Counter()
    for path in caption_files(folder, caption_extension):
        if path.is_file():
            counts.update(dedupe(split_tags(path.read_text(encoding="utf-8"))))
    return counts


def edit_captions(paths: Iterable[Path], add: Iterable[str] = (), remove: Iterable[str] = (),
                  replace: dict[str, str] | None = None, trigger_word: str | None = None,
                  old_trigger_words: Iterable[str] = (), manifest: CaptionManifest | None = None,
                  counts_as_edit: bool = True) -> list[Path]:
    """Apply one edit (:func:`edit_tag_list`) to each existing caption file; returns the files that changed.

    Files are rewritten atomically and only when their tags change. ``counts_as_edit`` makes a changed caption the
    user's in the manifest (a later overwrite keeps it); otherwise a caption lycolab wrote stays lycolab's (the
    undesired tags and trigger word of step 04, which a re-tag would apply anyway).
    """
    add, remove, old_trigger_words = list(add), list(remove), list(old_trigger_words)
    changed = []
    for path in paths:
        if not path.is_file():
            continue
        original = read_caption_text(path)
        updated = join_tags(edit_tag_list(split_tags(original), add, remove, replace, trigger_word,
                                          old_trigger_words))
        if updated == original:
            continue
        lycolabs = not counts_as_edit and manifest is not None and manifest.written_by_lycolab(path)
        write_caption(path, updated, manifest, by_lycolab=lycolabs)
        changed.append(path)
    if manifest is not None:
        manifest.save()
    return changed


def edit_folder(folder: str | Path, caption_extension: str = ".txt", remove: Iterable[str] = (),
                replace: dict[str, str] | None = None, add: Iterable[str] = (), trigger_word: str | None = None,
                old_trigger_words: Iterable[str] = (), manifest: CaptionManifest | None = None,
                counts_as_edit: bool = True) -> int:
    """Apply one edit to every caption file of the folder's images; returns how many files changed.

    ``replace`` maps a tag (exact, underscores ≈ spaces) to its new text; ``add`` appends tags not yet present.
    Without a ``manifest`` the folder's own (or the nearest above it) records the changes.
    """
    manifest = manifest or CaptionManifest.for_folder(folder)
    return len(edit_captions(caption_files(folder, caption_extension), add, remove, replace, trigger_word,
                             old_trigger_words, manifest, counts_as_edit))
