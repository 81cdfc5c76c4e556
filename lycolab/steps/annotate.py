"""Step 04: captions for every image in ``train_data/`` (and its subfolders) — WD1.4 tags for anime-style images,
BLIP sentences for photos — with undesired tags removed and the trigger word first; then the tag table and a look
at images with their captions (an editable browser when ipywidgets is available), and tag tools for all captions
at once (:func:`edit_tags`). A manifest beside the captions (lycolab.annotate.manifest) tells lycolab's captions
from the user's, so re-tagging never throws away an edit unless asked to (``overwrite_all``).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lycolab.annotate.batches import WRITE_MODES
from lycolab.annotate.manifest import CaptionManifest, write_caption
from lycolab.annotate.wd14 import TAGGERS
from lycolab.colab import Workspace
from lycolab.data.scan import IMAGE_EXTENSIONS, caption_suffix
from lycolab.display import Gallery, ShownAsTable, Table, one_line_errors

METHODS = ("wd14", "blip", "none")
MODES = WRITE_MODES  # skip, overwrite (keeps the user's edits), overwrite_all, append
TAGGER_NAMES = tuple(TAGGERS)  # the notebook's WD14 choices; a repo id or a folder works too


def image_folders(root: Path) -> list[Path]:
    """``root`` and every folder below it that holds images, sorted."""
    folders = [root, *sorted(path for path in root.rglob("*") if path.is_dir())]
    return [folder for folder in folders
            if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir() if p.is_file())]


def _split(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def caption_manifest(workspace: Workspace) -> CaptionManifest:
    """The record of what lycolab wrote to the captions under ``train_data/`` (see lycolab.annotate.manifest)."""
    return CaptionManifest(workspace.train_data)


@dataclass
class AnnotationSummary(ShownAsTable):
    method: str
    written: int = 0
    kept: int = 0
    edited: int = 0  # existing captions the undesired tags / trigger word changed
    bad_files: list[str] = field(default_factory=list)
    mode: str = "skip"
    edited_kept: int = 0  # overwrite: captions the user changed (or wrote), kept

    def table(self) -> Table:
        notes = [f"unreadable, skipped: {name}" for name in self.bad_files[:20]]
        if self.kept:
            notes.append(f"{self.kept} existing caption(s) kept; choose overwrite to re-tag those lycolab wrote, or "
                         "append to add tags")
        if self.edited_kept:
            notes.append(f"{self.edited_kept} edited caption(s) kept (changed since lycolab wrote them, or written "
                         "by hand); choose overwrite_all to replace them too")
        return Table([{"method": self.method, "mode": self.mode, "captions written": self.written,
                       "kept": self.kept, "edited captions kept": self.edited_kept, "cleaned up": self.edited}],
                     title="annotation", notes=notes)


@one_line_errors
def annotate(workspace: Workspace, method: str = "wd14", model: str = "", threshold: float = 0.35,
             character_threshold: float = 0.85, undesired_tags: str = "", trigger_word: str = "",
             caption_extension: str = ".txt", mode: str = "skip", batch_size: int = 8, blip_min_length: int = 5,
             blip_max_length: int = 75, blip_num_beams: int = 1) -> AnnotationSummary:
    """Tag or caption every image folder; ``mode`` is one of :data:`MODES`.

    ``skip`` keeps existing captions; ``overwrite`` re-writes only those lycolab wrote and nobody changed since
    (caption-editor and hand edits are kept and counted); ``overwrite_all`` re-writes every one; ``append`` (WD14)
    adds the tags a caption lacks. Whatever the method and mode — ``none`` does only this — every caption then ends
    without the undesired tags and with the trigger word first; a trigger word from an earlier run is replaced by
    the new one. An empty trigger word leaves the captions' trigger word (and the remembered one) as it is.
    ``model`` for WD14 is a name from :data:`TAGGER_NAMES`, a hub repo id or a folder.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    folders = image_folders(workspace.train_data)
    if not folders:
        raise ValueError(f"{workspace.train_data}: no images; run step 03 first")
    undesired, trigger = _split(undesired_tags), trigger_word.strip() or None
    previous = str(workspace.recall("trigger_word", "") or "").strip()
    cleanup = {"undesired": undesired, "trigger": trigger, "old_triggers": [previous] if previous else []}
    manifest = caption_manifest(workspace)
    summary = AnnotationSummary(method, mode=mode)
    if method == "wd14":
        _tag(folders, model, threshold, character_threshold, batch_size, caption_extension, mode, cleanup, manifest,
             summary)
    else:
        if method == "blip":
            _caption(folders, model, batch_size, blip_num_beams, blip_min_length, blip_max_length, caption_extension,
                     mode, manifest, summary)
        summary.edited = len(_clean(folders, caption_extension, cleanup, manifest))
    workspace.remember(caption_extension=caption_suffix(caption_extension), **({"trigger_word": trigger}
                                                                                if trigger else {}))
    return summary


def _tag(folders, model, threshold, character_threshold, batch_size, extension, mode, cleanup, manifest, summary):
    from lycolab.annotate.wd14 import DEFAULT_TAGGER, WD14Tagger, tag_folder

    tagger = functools.cache(lambda: WD14Tagger(model.strip() or DEFAULT_TAGGER))  # loaded once, if needed
    for folder in folders:
        result = tag_folder(folder, tagger, threshold, character_threshold, batch_size, extension,
                            undesired_tags=cleanup["undesired"], trigger_word=cleanup["trigger"], mode=mode,
                            old_trigger_words=cleanup["old_triggers"], manifest=manifest)
        _count(result, summary)
        summary.edited += len(result.cleaned)


def _caption(folders, model, batch_size, beams, min_length, max_length, extension, mode, manifest, summary):
    from lycolab.annotate.blip import DEFAULT_MODEL, caption_folder, load_blip

    model = model.strip() or DEFAULT_MODEL
    loaded = functools.cache(lambda: load_blip(model))  # loaded once, if some image needs a caption
    for folder in folders:
        result = caption_folder(folder, model, batch_size, beams, None, min_length, max_length,
                                caption_extension=extension, loaded=loaded, mode=mode, manifest=manifest)
        _count(result, summary)


def _count(result, summary: AnnotationSummary) -> None:
    summary.written += len(result.written)
    summary.kept += len(result.kept_existing)
    summary.edited_kept += len(result.kept_edited)
    summary.bad_files += result.bad_files


def _clean(folders: list[Path], extension: str, cleanup: dict, manifest: CaptionManifest) -> list[Path]:
    """Undesired tags out and the trigger word first in every caption; lycolab's captions stay lycolab's."""
    from lycolab.annotate.tags import caption_files, edit_captions

    if not (cleanup["undesired"] or cleanup["trigger"]):
        return []
    paths = [path for folder in folders for path in caption_files(folder, extension)]
    return edit_captions(paths, remove=cleanup["undesired"], trigger_word=cleanup["trigger"],
                         old_trigger_words=cleanup["old_triggers"], manifest=manifest, counts_as_edit=False)


@dataclass
class TagEdit(ShownAsTable):
    """What :func:`edit_tags` did, and the images whose caption holds the searched tags (a gallery)."""

    captions: int
    changed: list[Path] = field(default_factory=list)
    search: str = ""
    matches: list[tuple[Path, str]] = field(default_factory=list)  # (image, caption)
    shown: int = 24

    def table(self) -> Table:
        row = {"captions": self.captions, "changed": len(self.changed)}
        if self.search:
            row.update({"search": self.search, "images found": len(self.matches)})
        notes = ["changed captions count as your edits: overwrite keeps them"] if self.changed else []
        return Table([row], title="tag tools", notes=notes)

    def gallery(self) -> Gallery:
        shown = self.matches[: self.shown]
        return Gallery([image for image, _ in shown], [caption for _, caption in shown],
                       title=f"{len(shown)} of {len(self.matches)} images with {self.search}")

    def _repr_html_(self) -> str:
        return self.table()._repr_html_() + (self.gallery()._repr_html_() if self.matches else "")

    def __str__(self) -> str:
        return str(self.table()) + (f"\n{self.gallery()}" if self.matches else "")


@one_line_errors
def edit_tags(workspace: Workspace, add: str = "", remove: str = "", replace: str = "", trigger_word: str = "",
              undesired_tags: str = "", search: str = "", caption_extension: str = "", show: int = 24) -> TagEdit:
    """Edit the tags of every caption under ``train_data/`` at once, then find the images whose caption holds the
    ``search`` tags (all of them; wildcards allowed).

    ``add`` appends tags a caption lacks; ``remove`` and ``undesired_tags`` take tags out (wildcards such as
    ``*hair`` allowed); ``replace`` is ``old=>new, …`` (``old=>`` removes); ``trigger_word`` goes first, replacing
    the remembered one from earlier runs. Other tags keep their order, no tag is left twice, files are written
    atomically, and each changed caption counts as the user's edit, so a later overwrite keeps it.
    """
    from lycolab.annotate.tags import edit_captions, has_tags, parse_replacements

    extension = caption_extension or workspace.recall("caption_extension", ".txt")
    replacements = parse_replacements(replace)
    trigger = trigger_word.strip() or None
    previous = str(workspace.recall("trigger_word", "") or "").strip()
    pairs = _pairs(workspace, extension)
    changed = edit_captions([caption for _, caption in pairs], add=_split(add),
                            remove=_split(remove) + _split(undesired_tags), replace=replacements,
                            trigger_word=trigger, old_trigger_words=[previous] if previous else [],
                            manifest=caption_manifest(workspace), counts_as_edit=True)
    if trigger:
        workspace.remember(trigger_word=trigger)
    wanted = _split(search)
    matches = [(image, _read(caption)) for image, caption in pairs
               if wanted and caption.is_file() and has_tags(_read(caption), wanted)]
    return TagEdit(sum(caption.is_file() for _, caption in pairs), changed, search.strip(), matches, show)


def tag_table(workspace: Workspace, top: int = 30, caption_extension: str = "") -> Table:
    """The most frequent tags over all captions — what to put in undesired tags, or keep."""
    from lycolab.annotate.tags import tag_frequency

    extension = caption_extension or workspace.recall("caption_extension", ".txt")
    counts: Counter = Counter()
    for folder in image_folders(workspace.train_data):
        counts.update(tag_frequency(folder, extension))
    rows = [{"tag": tag, "images": count} for tag, count in counts.most_common(top)]
    return Table(rows, title=f"top {len(rows)} of {len(counts)} tags")


def _pairs(workspace: Workspace, extension: str) -> list[tuple[Path, Path]]:
    return [(image, image.with_suffix(caption_suffix(extension)))
            for folder in image_folders(workspace.train_data)
            for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


def caption_browser(workspace: Workspace, count: int = 6, caption_extension: str = ""):
    """An image/caption browser with an editable caption (ipywidgets), or a gallery of the first ``count`` images
    when widgets are not available."""
    extension = caption_extension or workspace.recall("caption_extension", ".txt")
    pairs = _pairs(workspace, extension)
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        shown = pairs[:count]
        return Gallery([image for image, _ in shown], [_read(caption) for _, caption in shown],
                       title=f"{len(shown)} of {len(pairs)} images")
    return CaptionEditor(pairs, caption_manifest(workspace)).widget


class CaptionEditor:
    """ipywidgets view: a slider picks the image, the caption can be edited and saved (atomically). A saved
    caption is the user's edit: the manifest forgets it, so overwrite keeps it."""

    def __init__(self, pairs: list[tuple[Path, Path]], manifest: CaptionManifest | None = None):
        import ipywidgets as widgets

        self.pairs = pairs
        self.manifest = manifest
        self.slider = widgets.IntSlider(min=0, max=max(len(pairs) - 1, 0), description="image")
        self.image = widgets.Image(format="jpeg", width=320)
        self.caption = widgets.Textarea(layout=widgets.Layout(width="100%", height="80px"))
        self.save = widgets.Button(description="save caption")
        self.status = widgets.Label()
        self.slider.observe(lambda change: self.show(change["new"]), names="value")
        self.save.on_click(lambda button: self.write())
        self.widget = widgets.VBox([self.slider, self.image, self.caption, widgets.HBox([self.save, self.status])])
        if pairs:
            self.show(0)

    def show(self, index: int) -> None:
        import base64

        from lycolab.display import thumbnail_data_uri

        image, caption = self.pairs[index]
        self.image.value = base64.b64decode(thumbnail_data_uri(image, 320).split(",", 1)[1])
        self.caption.value = _read(caption)
        self.status.value = image.name

    def write(self) -> None:
        _, caption = self.pairs[self.slider.value]
        manifest = self.manifest or CaptionManifest.for_folder(caption.parent)
        write_caption(caption, self.caption.value, manifest, by_lycolab=False)
        manifest.save()
        self.status.value = f"saved {caption.name}"
