"""The WD1.4 tagger (SmilingWolf's ONNX models) through onnxruntime: anime-style tags for every image of a folder.

A model folder holds ``model.onnx`` and ``selected_tags.csv`` (columns ``tag_id,name,category,count``; category 9 is
a rating, 4 a character, 0 a general tag); a hub repo id with those two files is downloaded when online. Images are
prepared as those models expect: composited and padded to a square on white, resized to the model's input size,
BGR channel order, float32 pixel values 0–255, NHWC.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from lycolab.annotate.batches import AnnotationResult, image_batches, images_to_annotate
from lycolab.annotate.tags import clean_caption, dedupe, join_tags, split_tags
from lycolab.data.scan import caption_suffix

logger = logging.getLogger(__name__)

DEFAULT_REPO = "SmilingWolf/wd-v1-4-convnextv2-tagger-v2"
RATING, GENERAL, CHARACTER = 9, 0, 4
WRITE_MODES = ("skip", "overwrite", "append")


class WD14Tagger:
    """One loaded tagger; ``tag_images`` returns tag lists in probability order (characters first)."""

    def __init__(self, model: str | Path = DEFAULT_REPO, providers: list[str] | None = None):
        import onnxruntime

        folder = _model_folder(model)
        available = onnxruntime.get_available_providers()
        providers = providers or [name for name in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                  if name in available]
        self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=providers)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        size = model_input.shape[1]
        self.size = size if isinstance(size, int) else 448
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
        batch = np.ascontiguousarray(np.stack([self.prepare(image) for image in images]))
        return self.session.run(None, {self.input_name: batch})[0]

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


def tag_folder(folder: str | Path, model: str | Path | WD14Tagger = DEFAULT_REPO, general_threshold: float = 0.35,
               character_threshold: float = 0.85, batch_size: int = 8, caption_extension: str = ".txt",
               include_rating: bool = False, underscores_to_spaces: bool = True, undesired_tags: list[str] = (),
               trigger_word: str | None = None, mode: str = "skip", progress: bool = True) -> AnnotationResult:
    """Tag every image directly in ``folder`` and write ``<image><caption_extension>`` files.

    ``mode`` decides what happens to an existing caption: ``skip`` keeps it (default: nothing is ever lost),
    ``overwrite`` replaces it, ``append`` adds the new tags after the old ones (duplicates dropped). Undesired tags
    are removed and the trigger word goes first, once.
    """
    from tqdm.auto import tqdm

    if mode not in WRITE_MODES:
        raise ValueError(f"mode must be one of {', '.join(WRITE_MODES)}, got {mode!r}")
    tagger = model if isinstance(model, WD14Tagger) else WD14Tagger(model)
    extension = caption_suffix(caption_extension)
    result = AnnotationResult()
    pending = images_to_annotate(folder, extension, mode == "skip", result)
    batches = image_batches(pending, batch_size, result)
    for paths, images in tqdm(batches, total=-(-len(pending) // batch_size), desc="tagging", disable=not progress):
        if not images:
            continue
        for image_path, probabilities in zip(paths, tagger.probabilities(images), strict=True):
            tags = tagger.tags(probabilities, general_threshold, character_threshold, include_rating,
                               underscores_to_spaces)
            result.written.append(_write_caption(image_path.with_suffix(extension), tags, mode, undesired_tags,
                                                 trigger_word))
    if result.kept_existing:
        logger.info("%d image(s) already had captions and were kept; use overwrite or append mode to change them",
                    len(result.kept_existing))
    return result


def _write_caption(path: Path, tags: list[str], mode: str, undesired: list[str], trigger_word: str | None) -> Path:
    if mode == "append" and path.exists():
        tags = dedupe(split_tags(path.read_text(encoding="utf-8")) + tags)
    path.write_text(clean_caption(join_tags(tags), undesired, trigger_word) + "\n", encoding="utf-8")
    return path


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
                         "model.onnx and selected_tags.csv") from None
    return files[0].parent
