"""Step 04: captions for every image in ``train_data/`` (and its subfolders) — WD1.4 tags for anime-style images,
BLIP sentences for photos — with undesired tags removed and the trigger word first; then the tag table and a look
at images with their captions (an editable browser when ipywidgets is available).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lycolab.colab import Workspace
from lycolab.data.scan import IMAGE_EXTENSIONS, caption_suffix
from lycolab.display import Gallery, ShownAsTable, Table, one_line_errors
from lycolab.files import atomic_write

METHODS = ("wd14", "blip", "none")


def image_folders(root: Path) -> list[Path]:
    """``root`` and every folder below it that holds images, sorted."""
    folders = [root, *sorted(path for path in root.rglob("*") if path.is_dir())]
    return [folder for folder in folders
            if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir() if p.is_file())]


def _split(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


@dataclass
class AnnotationSummary(ShownAsTable):
    method: str
    written: int = 0
    kept: int = 0
    edited: int = 0
    bad_files: list[str] = field(default_factory=list)

    def table(self) -> Table:
        notes = [f"unreadable, skipped: {name}" for name in self.bad_files[:20]]
        if self.kept:
            notes.append("existing captions were kept; choose overwrite or append to change them")
        return Table([{"method": self.method, "captions written": self.written, "kept": self.kept,
                       "edited": self.edited}], title="annotation", notes=notes)


@one_line_errors
def annotate(workspace: Workspace, method: str = "wd14", model: str = "", threshold: float = 0.35,
             character_threshold: float = 0.85, undesired_tags: str = "", trigger_word: str = "",
             caption_extension: str = ".txt", mode: str = "skip", batch_size: int = 8, blip_min_length: int = 5,
             blip_max_length: int = 75, blip_num_beams: int = 1) -> AnnotationSummary:
    """Tag or caption every image folder; ``mode`` is skip (keep existing captions), overwrite or append.

    ``method="none"`` only applies the undesired tags and trigger word to the captions already there.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    folders = image_folders(workspace.train_data)
    if not folders:
        raise ValueError(f"{workspace.train_data}: no images; run step 03 first")
    undesired, trigger = _split(undesired_tags), trigger_word.strip() or None
    summary = AnnotationSummary(method)
    if method == "wd14":
        _tag(folders, model, threshold, character_threshold, batch_size, caption_extension, undesired, trigger, mode,
             summary)
    elif method == "blip":
        _caption(folders, model, batch_size, blip_num_beams, blip_min_length, blip_max_length, caption_extension,
                 mode, summary)
    if method != "wd14" and (undesired or trigger):
        from lycolab.annotate.tags import edit_folder

        summary.edited = sum(edit_folder(folder, caption_extension, undesired, trigger_word=trigger)
                             for folder in folders)
    workspace.remember(caption_extension=caption_suffix(caption_extension), trigger_word=trigger or "")
    return summary


def _tag(folders, model, threshold, character_threshold, batch_size, extension, undesired, trigger, mode, summary):
    from lycolab.annotate.wd14 import DEFAULT_REPO, WD14Tagger, tag_folder

    tagger = WD14Tagger(model or DEFAULT_REPO)
    for folder in folders:
        result = tag_folder(folder, tagger, threshold, character_threshold, batch_size, extension,
                            undesired_tags=undesired, trigger_word=trigger, mode=mode)
        summary.written += len(result.written)
        summary.kept += len(result.kept_existing)
        summary.bad_files += result.bad_files


def _caption(folders, model, batch_size, beams, min_length, max_length, extension, mode, summary):
    from lycolab.annotate.blip import DEFAULT_MODEL, caption_folder, load_blip

    if mode == "append":
        raise ValueError("append works with WD14 tags; for BLIP choose skip or overwrite")
    loaded = load_blip(model or DEFAULT_MODEL)
    for folder in folders:
        result = caption_folder(folder, model or DEFAULT_MODEL, batch_size, beams, None, min_length, max_length,
                                caption_extension=extension, overwrite=mode == "overwrite", loaded=loaded)
        summary.written += len(result.written)
        summary.kept += len(result.kept_existing)
        summary.bad_files += result.bad_files


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
    return CaptionEditor(pairs).widget


class CaptionEditor:
    """ipywidgets view: a slider picks the image, the caption can be edited and saved (atomically)."""

    def __init__(self, pairs: list[tuple[Path, Path]]):
        import ipywidgets as widgets

        self.pairs = pairs
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
        text = self.caption.value.strip() + "\n"
        atomic_write(caption, lambda temporary: temporary.write_text(text, encoding="utf-8"))
        self.status.value = f"saved {caption.name}"
