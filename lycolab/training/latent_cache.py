"""Latents encoded once per image (``cache_latents``), optionally kept on disk beside the images
(``cache_latents_to_disk``) so the next run — or a restarted Colab runtime — skips the VAE.

A disk entry is ``<image file name>.latents.safetensors`` holding ``latents`` (and ``latents_flipped`` for
``flip_aug``) with a fingerprint of the image file (size and modification time), its bucket and resize, and the VAE
(its config and first/last weights). Any change makes the entry stale and it is encoded again; entries are written
atomically, so an interrupted run never leaves a half-written cache behind.

Entries are still checked when read — a copy or sync cut short, or an older writer, can leave a truncated file, a
tensor of the wrong shape or NaNs under the final name — and any such entry is encoded again, to exactly the bits a
clean run gets (each image's VAE sample has its own random stream). Hidden temporary files a killed run left are
removed. A write that fails (disk full) only warns: the latents stay in memory for this run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lycolab.data.dataset import BucketedDataset
from lycolab.files import save_safetensors, temporary_path, writing_folder
from lycolab.training.seeds import torch_generator

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".latents.safetensors"


CACHE_STREAM = 2  # the latent cache's random streams, apart from the training loop's


def encode_latents(vae, pixels: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] → scaled latents the U-Net trains on, sampled from the VAE's posterior; with one CPU
    generator per image the sample depends only on that generator, not on the batch it was encoded in."""
    distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    if generators is None:
        latents = distribution.sample()
    else:
        shape = distribution.mean.shape[1:]
        noise = torch.stack([torch.randn(shape, generator=generator) for generator in generators])
        latents = distribution.mean + distribution.std * noise.to(distribution.mean.device, distribution.mean.dtype)
    return latents * vae.config.scaling_factor


def vae_fingerprint(vae) -> str:
    """Identifies a VAE cheaply: its config and the bytes of its first and last convolutions."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for module in (vae.encoder.conv_in, getattr(vae, "quant_conv", None) or vae.encoder.conv_out):
        digest.update(module.weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.name + CACHE_SUFFIX)


class LatentCache:
    """Every image's latent (and mirrored latent when its subset uses ``flip_aug``), indexed like the dataset."""

    def __init__(self, dataset: BucketedDataset, vae, batch_size: int, to_disk: bool = False, seed: int = 0):
        self.dataset = dataset
        self.seed = seed
        self.to_disk = to_disk
        self.vae_id = vae_fingerprint(vae) if to_disk else ""
        self.latent_channels = vae.config.latent_channels
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latents: dict[int, torch.Tensor] = {}
        self.flipped: dict[int, torch.Tensor] = {}
        self.loaded_from_disk = 0
        self.damaged: list[Path] = []
        self.write_failed = False
        if to_disk:
            self._remove_leftovers()
        missing = [index for index in range(len(dataset)) if not (to_disk and self._load(index))]
        self._encode(vae, missing, batch_size)
        if to_disk:
            logger.info("latents: %d read from disk, %d encoded and saved", self.loaded_from_disk, len(missing))
        if self.damaged:
            logger.warning("latents: %d damaged cache file(s) encoded again, e.g. %s", len(self.damaged),
                           self.damaged[0])

    def get(self, index: int, flip: bool = False) -> torch.Tensor:
        return self.flipped[index] if flip else self.latents[index]

    def _needs_flip(self, index: int) -> bool:
        return self.dataset.items[index].record.subset.flip_aug

    def fingerprint(self, index: int) -> str:
        item = self.dataset.items[index]
        stat = item.record.path.stat()
        return (f"{stat.st_size}:{stat.st_mtime_ns}:{item.bucket.resized_size}:{item.bucket.bucket_resolution}:"
                f"{self.vae_id}")

    def latent_shape(self, index: int) -> tuple[int, int, int]:
        """(channels, height, width) of this image's latent: its bucket divided by the VAE's downscale."""
        width, height = self.dataset.items[index].bucket.bucket_resolution
        return self.latent_channels, height // self.downscale, width // self.downscale

    def _remove_leftovers(self) -> None:
        """Hidden temporary files of a run killed while writing this cache (they hold nothing to reuse)."""
        for item in self.dataset.items:
            entry = cache_path(item.record.path)
            for leftover in (temporary_path(entry), writing_folder(entry)):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                elif leftover.exists():
                    leftover.unlink(missing_ok=True)

    def _load(self, index: int) -> bool:
        """Read a current, sound entry; a stale one (changed image, bucket or VAE) or a damaged one is not used."""
        path = cache_path(self.dataset.items[index].record.path)
        if not path.is_file():
            return False
        names = ("latents", "latents_flipped") if self._needs_flip(index) else ("latents",)
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("fingerprint") != self.fingerprint(index):
                    return False
                tensors = {name: handle.get_tensor(name) for name in names if name in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError):
            tensors = {}  # truncated or garbage: encoded again
        if not all(name in tensors and self._sound(index, tensors[name]) for name in names):
            self.damaged.append(path)
            return False
        self.latents[index] = tensors["latents"]
        if self._needs_flip(index):
            self.flipped[index] = tensors["latents_flipped"]
        self.loaded_from_disk += 1
        return True

    def _sound(self, index: int, latent: torch.Tensor) -> bool:
        return (latent.dtype == torch.float32 and tuple(latent.shape) == self.latent_shape(index)
                and bool(torch.isfinite(latent).all()))

    @torch.no_grad()
    def _encode(self, vae, indices: list[int], batch_size: int) -> None:
        """Encode in batches of one bucket size (the VAE needs equal sizes), mirrored copies alongside."""
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index in indices:
            by_bucket.setdefault(self.dataset.items[index].bucket.bucket_resolution, []).append(index)
        for bucket_indices in by_bucket.values():
            for start in range(0, len(bucket_indices), batch_size):
                chunk = bucket_indices[start : start + batch_size]
                pixels = torch.stack([self.dataset.pixels(i) for i in chunk])
                latents = encode_latents(vae, pixels, self._generators(chunk, flip=False)).float().cpu()
                self.latents.update(zip(chunk, latents, strict=True))
                flip_chunk = [i for i in chunk if self._needs_flip(i)]
                if flip_chunk:
                    pixels = torch.stack([self.dataset.pixels(i, flip=True) for i in flip_chunk])
                    latents = encode_latents(vae, pixels, self._generators(flip_chunk, flip=True)).float().cpu()
                    self.flipped.update(zip(flip_chunk, latents, strict=True))
                if self.to_disk:
                    for index in chunk:
                        self._save(index)

    def _generators(self, indices: list[int], flip: bool) -> list[torch.Generator]:
        """One stream per image, so a latent never depends on the batch, the process or what ran before
        (a resumed run re-encodes exactly the same latents)."""
        return [torch_generator(self.seed, CACHE_STREAM, index, int(flip)) for index in indices]

    def _save(self, index: int) -> None:
        """Write one entry; after a failed write (disk full) the rest of the cache stays in memory only, said once."""
        if self.write_failed:
            return
        tensors = {"latents": self.latents[index].contiguous()}
        if index in self.flipped:
            tensors["latents_flipped"] = self.flipped[index].contiguous()
        metadata = {"fingerprint": self.fingerprint(index)}
        try:
            save_safetensors(cache_path(self.dataset.items[index].record.path), tensors, metadata)
        except OSError as error:
            self.write_failed = True
            logger.warning("%s; the latent cache stays in memory only for this run", error)
