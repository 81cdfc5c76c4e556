"""Text-encoder outputs computed once per caption (sd-scripts' ``cache_text_encoder_outputs``), optionally kept on
disk beside the images (``cache_text_encoder_outputs_to_disk``).

SDXL's two text encoders are 0.8 B parameters; with their outputs cached they leave the GPU for the whole run (only
sampling brings them back), which is what lets SDXL LoRA training fit a 15 GB T4. Captions must then be the same
every epoch (config.py refuses shuffling, dropout, warm-up and wildcards with it) and no text-encoder adapter can
train. A disk entry is ``<image file name>.te_outputs.safetensors`` holding ``states`` (and ``pooled`` for SDXL)
with a fingerprint of the caption, the encoding options and the text encoders; a stale or damaged entry is encoded
again, and a failed write (disk full) only warns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lycolab.data.dataset import BucketedDataset
from lycolab.files import save_safetensors
from lycolab.models.text import Conditioning, encode_conditioning

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".te_outputs.safetensors"


def cache_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.name + CACHE_SUFFIX)


def text_encoders_fingerprint(parts) -> str:
    """Identifies the text encoders cheaply: their configs and the bytes of their token embeddings' first rows."""
    digest = hashlib.sha256()
    for encoder in parts.text_encoders:
        digest.update(json.dumps(encoder.config.to_dict(), sort_keys=True, default=str).encode())
        embedding = encoder.get_input_embeddings().weight
        digest.update(embedding[:8].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class TextEncoderCache:
    """Every item's conditioning (CPU, float32), indexed like the dataset; identical captions are encoded once."""

    def __init__(self, dataset: BucketedDataset, parts, clip_skip: int | None, max_token_length: int | None,
                 batch_size: int, to_disk: bool = False, device: torch.device | str | None = None):
        self.dataset = dataset
        self.to_disk = to_disk
        self.options = f"{clip_skip}:{max_token_length}:{text_encoders_fingerprint(parts) if to_disk else ''}"
        # captions cannot change between epochs here (config.py), so any epoch's caption is every epoch's
        self.captions = [dataset.caption(index, random.Random(0), 1) for index in range(len(dataset))]
        self.entries: dict[int, Conditioning] = {}
        self.write_failed = False
        loaded = [index for index in range(len(dataset)) if to_disk and self._load(index)]
        missing = [index for index in range(len(dataset)) if index not in self.entries]
        self._encode(parts, missing, clip_skip, max_token_length, max(1, batch_size), device)
        logger.info("text encoder outputs cached: %d caption(s)%s", len(dataset),
                    f", {len(loaded)} read from disk" if to_disk else "")

    def batch(self, indices: list[int], device: torch.device | str) -> Conditioning:
        entries = [self.entries[index] for index in indices]
        pooled = None
        if entries[0].pooled is not None:
            pooled = torch.stack([entry.pooled for entry in entries]).to(device)
        return Conditioning(torch.stack([entry.states for entry in entries]).to(device), pooled)

    def fingerprint(self, index: int) -> str:
        return hashlib.sha256(f"{self.captions[index]}\0{self.options}".encode()).hexdigest()[:32]

    @torch.no_grad()
    def _encode(self, parts, indices: list[int], clip_skip: int | None, max_token_length: int | None,
                batch_size: int, device) -> None:
        unique = sorted({self.captions[index] for index in indices})
        encoded: dict[str, Conditioning] = {}
        for start in range(0, len(unique), batch_size):
            captions = unique[start : start + batch_size]
            output = encode_conditioning(parts, captions, clip_skip, max_token_length, device)
            pooled = [None] * len(captions) if output.pooled is None else output.pooled.float().cpu()
            for position, caption in enumerate(captions):
                encoded[caption] = Conditioning(output.states[position].float().cpu(), pooled[position])
        for index in indices:
            self.entries[index] = encoded[self.captions[index]]
            if self.to_disk:
                self._save(index)

    def _load(self, index: int) -> bool:
        path = cache_path(self.dataset.items[index].record.path)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("fingerprint") != self.fingerprint(index):
                    return False
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError):
            return False  # truncated or garbage: encoded again
        states, pooled = tensors.get("states"), tensors.get("pooled")
        if states is None or states.dim() != 2 or not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            return False
        self.entries[index] = Conditioning(states.float(), None if pooled is None else pooled.float())
        return True

    def _save(self, index: int) -> None:
        if self.write_failed:
            return
        entry = self.entries[index]
        tensors = {"states": entry.states.contiguous()}
        if entry.pooled is not None:
            tensors["pooled"] = entry.pooled.contiguous()
        try:
            save_safetensors(cache_path(self.dataset.items[index].record.path), tensors,
                             {"fingerprint": self.fingerprint(index)})
        except OSError as error:
            self.write_failed = True
            logger.warning("%s; the text-encoder cache stays in memory only for this run", error)


@contextmanager
def text_encoders_on(parts, device: torch.device | str, dtype: torch.dtype):
    """The text encoders on ``device`` for a while (sampling), back where they were afterwards: with cached
    outputs they wait on the CPU, so the GPU memory they would hold stays free for training."""
    places = [(encoder, next(encoder.parameters()).device) for encoder in parts.text_encoders]
    moved = [(encoder, place) for encoder, place in places if place != torch.device(device)]
    for encoder, _ in moved:
        encoder.to(device, dtype)
    try:
        yield
    finally:
        for encoder, place in moved:
            encoder.to(place)
