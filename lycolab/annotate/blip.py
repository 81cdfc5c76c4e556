"""BLIP captions (transformers) for general, non-anime images: one sentence per image, written beside it.

Like sd-scripts' ``make_captions.py``: beam search by default (``num_beams``), or nucleus sampling (``top_p``),
with ``min_length`` / ``max_length`` in tokens, batches, and an optional prefix/suffix (e.g. a trigger word).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lycolab.data.images import UnreadableImage, open_rgb
from lycolab.data.scan import list_images

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"


@dataclass
class CaptionResult:
    written: list[Path] = field(default_factory=list)
    kept_existing: list[Path] = field(default_factory=list)
    bad_files: list[str] = field(default_factory=list)


def load_blip(model: str | Path = DEFAULT_MODEL, device: str | None = None):
    """(processor, model) from a hub id or a local folder, on the GPU when there is one."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    try:
        processor = BlipProcessor.from_pretrained(str(model))
        blip = BlipForConditionalGeneration.from_pretrained(str(model))
    except OSError as error:
        raise ValueError(f"{model}: cannot load BLIP ({str(error).splitlines()[0]}); give a local folder or go "
                         "online") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return processor, blip.to(device).eval()


@torch.no_grad()
def caption_folder(folder: str | Path, model: str | Path = DEFAULT_MODEL, batch_size: int = 8, num_beams: int = 1,
                   top_p: float | None = None, min_length: int = 5, max_length: int = 75, prefix: str = "",
                   suffix: str = "", caption_extension: str = ".caption", overwrite: bool = False,
                   progress: bool = True, loaded=None) -> CaptionResult:
    """Caption every image directly in ``folder``; existing captions are kept unless ``overwrite``.

    ``top_p`` switches from beam search to nucleus sampling. ``loaded`` may be a (processor, model) pair from
    :func:`load_blip` to reuse between folders.
    """
    from tqdm.auto import tqdm

    processor, blip = loaded or load_blip(model)
    extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    result = CaptionResult()
    pending = []
    for image_path in list_images(folder):
        target = image_path.with_suffix(extension)
        if target.exists() and not overwrite:
            result.kept_existing.append(target)
        else:
            pending.append(image_path)
    options = {"max_length": max_length, "min_length": min_length}
    options.update({"do_sample": True, "top_p": top_p} if top_p else {"num_beams": num_beams})
    for start in tqdm(range(0, len(pending), batch_size), desc="captioning", disable=not progress):
        images, paths = [], []
        for image_path in pending[start : start + batch_size]:
            try:
                images.append(open_rgb(image_path))
                paths.append(image_path)
            except UnreadableImage as error:
                logger.warning("skipping %s", error)
                result.bad_files.append(str(error))
        if not images:
            continue
        inputs = processor(images=images, return_tensors="pt").to(blip.device)
        texts = processor.batch_decode(blip.generate(**inputs, **options), skip_special_tokens=True)
        for image_path, text in zip(paths, texts, strict=True):
            caption = " ".join(part for part in (prefix.strip(), text.strip(), suffix.strip()) if part)
            target = image_path.with_suffix(extension)
            target.write_text(caption + "\n", encoding="utf-8")
            result.written.append(target)
    return result
