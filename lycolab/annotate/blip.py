"""BLIP captions (transformers) for general, non-anime images: one sentence per image, written beside it.

Like sd-scripts' ``make_captions.py``: beam search by default (``num_beams``), or nucleus sampling (``top_p``),
with ``min_length`` / ``max_length`` in tokens, batches, and an optional prefix/suffix (e.g. a trigger word).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lycolab.annotate.batches import AnnotationResult, check_mode, image_batches, images_to_annotate, report_kept
from lycolab.annotate.manifest import CaptionManifest, write_caption
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
                   progress: bool = True, loaded=None, *, mode: str | None = None,
                   manifest: CaptionManifest | None = None) -> AnnotationResult:
    """Caption every image directly in ``folder``.

    ``mode`` is skip (default), overwrite (only captions lycolab wrote and nobody changed since) or overwrite_all;
    ``overwrite=True`` means overwrite. ``top_p`` switches from beam search to nucleus sampling; ``num_beams``,
    ``min_length`` and ``max_length`` (in tokens) go to ``generate`` as they are. ``loaded`` may be a (processor,
    model) pair from :func:`load_blip` to reuse between folders, or a function giving one (called only when some
    image needs a caption); ``manifest`` (default: the folder's, or the nearest above it) records what lycolab
    wrote.
    """
    from tqdm.auto import tqdm

    mode = check_mode(mode or ("overwrite" if overwrite else "skip"))
    if mode == "append":
        raise ValueError("append works with WD14 tags; for BLIP choose skip, overwrite or overwrite_all")
    options = generation_options(num_beams, top_p, min_length, max_length)
    extension = caption_suffix(caption_extension)
    manifest = manifest or CaptionManifest.for_folder(folder)
    result = AnnotationResult()
    pending = images_to_annotate(folder, extension, mode, result, manifest)
    if not pending:  # nothing to caption: the model is not even loaded
        report_kept(result)
        return result
    processor, blip = (loaded() if callable(loaded) else loaded) or load_blip(model)
    batches = image_batches(pending, batch_size, result)
    for paths, images in tqdm(batches, total=-(-len(pending) // batch_size), desc="captioning",
                              disable=not progress):
        if not images:
            continue
        inputs = processor(images=images, return_tensors="pt").to(blip.device)
        texts = processor.batch_decode(blip.generate(**inputs, **options), skip_special_tokens=True)
        for image_path, text in zip(paths, texts, strict=True):
            caption = " ".join(part for part in (prefix.strip(), text.strip(), suffix.strip()) if part)
            result.written.append(write_caption(image_path.with_suffix(extension), caption, manifest, True))
        manifest.save()
    report_kept(result)
    return result


def generation_options(num_beams: int = 1, top_p: float | None = None, min_length: int = 5, max_length: int = 75
                       ) -> dict:
    """The keyword arguments ``generate`` gets: beam search with ``num_beams``, or sampling with ``top_p``."""
    if min_length > max_length:
        raise ValueError(f"blip min_length ({min_length}) is longer than max_length ({max_length})")
    options = {"max_length": max_length, "min_length": min_length}
    options.update({"do_sample": True, "top_p": top_p} if top_p else {"num_beams": max(int(num_beams), 1)})
    return options
