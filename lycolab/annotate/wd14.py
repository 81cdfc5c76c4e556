"""The WD1.4 tagger (SmilingWolf's ONNX models) through onnxruntime: anime-style tags for every image of a folder.

A model folder holds ``model.onnx`` and ``selected_tags.csv`` (columns ``tag_id,name,category,count``; category 9 is
a rating, 4 a character, 0 a general tag); a short name from :data:`TAGGERS` or a hub repo id with those two files is
downloaded when online. The v2 (``wd-v1-4-…-tagger-v2``) and v3 (``wd-…-tagger-v3``) taggers take the same input,
so one preparation serves both: composited and padded to a square on white, resized (bicubic) to the size the
model's input shape names, BGR channel order, float32 pixel values 0–255, NHWC. v3 models are stamped with the
``ai.onnx.ml`` opset 4, which onnxruntime reads from 1.17 on; an older one fails with a line saying so.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from lycolab.annotate.batches import (
    WRITE_MODES,
    AnnotationResult,
    check_mode,
    image_batches,
    images_to_annotate,
    report_kept,
)
from lycolab.annotate.manifest import CaptionManifest, read_caption_text, write_caption
from lycolab.annotate.tags import append_tags, caption_files, clean_caption, edit_captions, join_tags, split_tags
from lycolab.data.scan import caption_suffix

logger = logging.getLogger(__name__)

# The notebook's choices: a short name for each of SmilingWolf's taggers (any other repo id or folder works too).
TAGGERS = {
    "wd-v3-swinv2": "SmilingWolf/wd-swinv2-tagger-v3",
    "wd-v3-convnext": "SmilingWolf/wd-convnext-tagger-v3",
    "wd-v3-vit": "SmilingWolf/wd-vit-tagger-v3",
    "wd-v3-vit-large": "SmilingWolf/wd-vit-large-tagger-v3",
    "wd-v3-eva02-large": "SmilingWolf/wd-eva02-large-tagger-v3",
    "wd-v2-convnextv2": "SmilingWolf/wd-v1-4-convnextv2-tagger-v2",
    "wd-v2-convnext": "SmilingWolf/wd-v1-4-convnext-tagger-v2",
    "wd-v2-swinv2": "SmilingWolf/wd-v1-4-swinv2-tagger-v2",
    "wd-v2-vit": "SmilingWolf/wd-v1-4-vit-tagger-v2",
    "wd-v2-moat": "SmilingWolf/wd-v1-4-moat-tagger-v2",
}
DEFAULT_TAGGER = "wd-v2-convnextv2"
DEFAULT_REPO = TAGGERS[DEFAULT_TAGGER]
RATING, GENERAL, CHARACTER = 9, 0, 4
DEFAULT_SIZE = 448  # when the model's input shape leaves the size open
__all__ = ["TAGGERS", "DEFAULT_TAGGER", "DEFAULT_REPO", "WRITE_MODES", "WD14Tagger", "tagger_source", "tag_folder"]


def tagger_source(model: str | Path) -> str | Path:
    """A short name (``wd-v3-swinv2``) as its hub repo; a folder or repo id unchanged."""
    return TAGGERS.get(str(model).strip().lower(), model) if isinstance(model, str) else model


class WD14Tagger:
    """One loaded tagger: :meth:`probabilities` for a batch of images, :meth:`tags` for one row of them."""

    def __init__(self, model: str | Path = DEFAULT_REPO, providers: list[str] | None = None):
        import onnxruntime

        folder = _model_folder(tagger_source(model))
        available = onnxruntime.get_available_providers()
        providers = providers or [name for name in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                  if name in available]
        try:
            self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=providers)
        except Exception as error:  # onnxruntime's own Fail/InvalidGraph/…: one line saying what to do
            raise ValueError(_load_failure(folder / "model.onnx", error, onnxruntime.__version__)) from None
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name  # later outputs (embeddings) are not needed
        self.size, self.fixed_batch = _input_layout(folder, model_input.shape)
        self.names, self.categories = _read_tags(folder / "selected_tags.csv")
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.names):
            raise ValueError(f"{folder}: selected_tags.csv has {len(self.names)} tags but the model outputs "
                             f"{outputs}; the two files are from different models")

    def prepare(self, image: Image.Image) -> np.ndarray:
        """H x W x 3 float32, BGR, 0-255, padded to a white square and resized to the model's size."""
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        if side != self.size:
            square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """One row of tag probabilities per image; a model exported for a fixed batch size gets full batches
        (the last one padded, its extra rows dropped)."""
        batch = np.ascontiguousarray(np.stack([self.prepare(image) for image in images]))
        if not self.fixed_batch:
            return self._run(batch)
        rows = []
        for start in range(0, len(batch), self.fixed_batch):
            chunk = batch[start : start + self.fixed_batch]
            padding = np.zeros((self.fixed_batch - len(chunk), *chunk.shape[1:]), np.float32)
            rows.append(self._run(np.concatenate([chunk, padding]))[: len(chunk)])
        return np.concatenate(rows)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def tags(self, probabilities: np.ndarray, general_threshold: float = 0.35, character_threshold: float = 0.85,
             include_rating: bool = False, underscores_to_spaces: bool = True) -> list[str]:
        """Tags over their category's threshold: characters, then general tags, each by falling probability; the
        most likely rating first when asked for."""
        chosen = []
        for category, threshold in ((CHARACTER, character_threshold), (GENERAL, general_threshold)):
            indices = [i for i, kind in enumerate(self.categories) if kind == category
                       and probabilities[i] >= threshold]
            chosen += sorted(indices, key=lambda i: -probabilities[i])
        if include_rating:
            ratings = [i for i, kind in enumerate(self.categories) if kind == RATING]
            if ratings:
                chosen.insert(0, max(ratings, key=lambda i: probabilities[i]))
        names = [self.names[i] for i in chosen]
        return [name.replace("_", " ") if underscores_to_spaces and len(name) > 3 else name for name in names]


def tag_folder(folder: str | Path, model: str | Path | WD14Tagger | Callable[[], WD14Tagger] = DEFAULT_REPO,
               general_threshold: float = 0.35, character_threshold: float = 0.85, batch_size: int = 8,
               caption_extension: str = ".txt", include_rating: bool = False, underscores_to_spaces: bool = True,
               undesired_tags: list[str] = (), trigger_word: str | None = None, mode: str = "skip",
               progress: bool = True, *, old_trigger_words: list[str] = (), manifest: CaptionManifest | None = None
               ) -> AnnotationResult:
    """Tag every image directly in ``folder`` and write ``<image><caption_extension>`` files.

    ``mode`` decides what happens to an existing caption (:data:`WRITE_MODES`): ``skip`` keeps it (default:
    nothing is ever lost); ``overwrite`` replaces it only when lycolab wrote it and nobody changed it since, so
    edits and hand-made captions stay (``result.kept_edited``); ``overwrite_all`` replaces every one; ``append``
    adds the new tags it lacks. Every caption of the folder, kept ones too, ends without the undesired tags and with
    the trigger word first, once — an old trigger word (``old_trigger_words``) is replaced by the new one. The
    ``manifest`` (default: the folder's, or the nearest above it) records what lycolab wrote. ``model`` is a name
    from :data:`TAGGERS`, a repo id, a folder, a loaded :class:`WD14Tagger`, or a function giving one (called only
    when some image needs tags, so sharing one between folders loads it at most once).
    """
    from tqdm.auto import tqdm

    check_mode(mode)
    extension = caption_suffix(caption_extension)
    manifest = manifest or CaptionManifest.for_folder(folder)
    undesired, old_trigger_words = list(undesired_tags), list(old_trigger_words)
    result = AnnotationResult()
    pending = images_to_annotate(folder, extension, mode, result, manifest)
    tagger = _loaded(model) if pending else None  # nothing to tag: no download
    batches = image_batches(pending, batch_size, result)
    for paths, images in tqdm(batches, total=-(-len(pending) // batch_size), desc="tagging", disable=not progress):
        if not images:
            continue
        for image_path, probabilities in zip(paths, tagger.probabilities(images), strict=True):
            tags = tagger.tags(probabilities, general_threshold, character_threshold, include_rating,
                               underscores_to_spaces)
            result.written.append(_write_tags(image_path.with_suffix(extension), tags, mode, manifest,
                                              (undesired, trigger_word, old_trigger_words)))
        manifest.save()  # after every batch: a stopped run still knows what it wrote
    written = set(result.written)
    others = [path for path in caption_files(folder, extension) if path not in written]
    result.cleaned = edit_captions(others, remove=undesired, trigger_word=trigger_word,
                                   old_trigger_words=old_trigger_words, manifest=manifest, counts_as_edit=False)
    report_kept(result)
    return result


def _loaded(model) -> WD14Tagger:
    if isinstance(model, WD14Tagger):
        return model
    return model() if callable(model) else WD14Tagger(model)


def _write_tags(path: Path, tags: list[str], mode: str, manifest: CaptionManifest, cleanup: tuple) -> Path:
    """Write the tagger's caption, cleaned; ``append`` keeps the existing tags first and adds only the missing
    ones, and a caption that was the user's stays the user's."""
    users = False
    if mode == "append" and path.is_file():
        users = manifest.is_users(path)
        tags = append_tags(split_tags(read_caption_text(path)), tags)
    return write_caption(path, clean_caption(join_tags(tags), *cleanup), manifest, by_lycolab=not users)


def _read_tags(path: Path) -> tuple[list[str], list[int]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise ValueError(f"{path}: expected columns tag_id,name,category,count")
    return [row["name"] for row in rows], [int(row["category"]) for row in rows]


def _model_folder(model: str | Path) -> Path:
    """A local folder, or a hub repo's two files downloaded into the cache."""
    path = Path(model)
    if path.is_dir():
        missing = [name for name in ("model.onnx", "selected_tags.csv") if not (path / name).is_file()]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}; a WD14 tagger folder needs both files")
        return path
    from huggingface_hub import hf_hub_download

    try:
        files = [Path(hf_hub_download(str(model), name)) for name in ("model.onnx", "selected_tags.csv")]
    except Exception as error:  # offline, unknown repo, no permission: one clear line
        raise ValueError(f"{model}: cannot get the tagger ({type(error).__name__}); give a local folder with "
                         f"model.onnx and selected_tags.csv, or one of {', '.join(TAGGERS)} when online") from None
    return files[0].parent


def _input_layout(folder: Path, shape: list) -> tuple[int, int | None]:
    """(image size, fixed batch size or None) from the model's input shape, which must be NHWC with 3 channels."""
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"{folder}: the model takes input of shape {shape}, not images as (batch, height, width, 3);"
                         " it is not a WD14 tagger")
    size = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIZE
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return size, batch


def _load_failure(path: Path, error: Exception, version: str) -> str:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    major_minor = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if "opset" in reason.lower() or major_minor < (1, 17):
        fix = (f"v3 taggers need onnxruntime 1.17 or newer (this is {version}): pip install -U onnxruntime, or "
               "onnxruntime-gpu on a GPU; or choose a v2 tagger")
    else:
        fix = "the file may be damaged: delete it and download it again"
    return f"{path}: onnxruntime cannot load it ({reason[:200]}); {fix}"
