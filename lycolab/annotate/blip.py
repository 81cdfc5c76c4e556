"""BLIP captions (transformers) for general, non-anime images: one sentence per image, written beside it.

Like sd-scripts' ``make_captions.py``: beam search by default (``num_beams``), or nucleus sampling (``top_p``),
with ``min_length`` / ``max_length`` in tokens, batches, and an optional prefix/suffix (e.g. a trigger word).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lycolab.annotate.batches import AnnotationResult, image_batches, images_to_annotate
from lycolab.data.scan import caption_suffix

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"


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
                   progress: bool = True, loaded=None) -> AnnotationResult:
    """Caption every image directly in ``folder``; existing captions are kept unless ``overwrite``.

    ``top_p`` switches from beam search to nucleus sampling. ``loaded`` may be a (processor, model) pair from
    :func:`load_blip` to reuse between folders.
    """
    from tqdm.auto import tqdm

    processor, blip = loaded or load_blip(model)
    extension = caption_suffix(caption_extension)
    result = AnnotationResult()
    pending = images_to_annotate(folder, extension, not overwrite, result)
    options = {"max_length": max_length, "min_length": min_length}
    options.update({"do_sample": True, "top_p": top_p} if top_p else {"num_beams": num_beams})
    batches = image_batches(pending, batch_size, result)
    for paths, images in tqdm(batches, total=-(-len(pending) // batch_size), desc="captioning",
                              disable=not progress):
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
