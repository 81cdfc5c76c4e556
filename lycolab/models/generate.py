"""Images from a base model with adapters applied at chosen ratios (``lycolab generate``), and baking adapters
into a saved model (``lycolab merge``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lycolab.models.load import StableDiffusionParts, load_stable_diffusion


def parse_network_spec(spec: str) -> tuple[Path, float]:
    """``"file.safetensors:0.7"`` → (path, 0.7); without a ratio it is 1.0 (a Windows drive letter is not one)."""
    path, separator, ratio = spec.rpartition(":")
    if separator and path and not path.endswith(("\\", "/")) and _is_number(ratio):
        return Path(path), float(ratio)
    return Path(spec), 1.0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_with_networks(model: str | Path, networks: Sequence[tuple[str | Path, float]], vae: str | Path | None = None,
                       v_parameterization: bool = False, device: str | None = None,
                       model_config: str | Path | None = None) -> StableDiffusionParts:
    """The base model with each adapter file applied at its ratio (U-Net and text encoder)."""
    from lycolab.networks import load_network

    parts = load_stable_diffusion(model, vae, v_parameterization, model_config)
    for path, ratio in networks:
        load_network(path, parts.unet, parts.text_encoders, multiplier=ratio)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for module in parts.models:
        module.to(device).eval()
    return parts


def generate(model: str | Path, prompts: Sequence[str], out: str | Path, networks: Sequence[tuple[str | Path, float]]
             = (), sampler: str = "euler_a", vae: str | Path | None = None, clip_skip: int | None = None,
             max_token_length: int | None = None, v_parameterization: bool = False,
             model_config: str | Path | None = None) -> list[Path]:
    """Render kohya-style prompt lines (``prompt --n neg --w 512 --h 768 --s 28 --l 7 --d 42``) to PNGs.

    ``out`` is a ``.png`` path for one prompt, else a folder that gets ``image_00.png``, ``image_01.png`` …
    """
    from lycolab.training.sampling import SamplePrompt, generate_samples, parse_prompt_line

    samples = [sample for line in prompts if (sample := parse_prompt_line(line, SamplePrompt(""))) is not None]
    if not samples:
        raise ValueError("no prompt given; pass --prompt or a prompt file")
    parts = load_with_networks(model, networks, vae, v_parameterization, model_config=model_config)
    out = Path(out)
    single = out.suffix.lower() == ".png" and len(samples) == 1
    folder = out.parent if single else out
    paths = generate_samples(parts, samples, folder, out.stem if single else "image", sampler, clip_skip,
                             max_token_length)
    if single:
        paths[0].replace(out)
        return [out]
    return paths


def merge_into_model(model: str | Path, networks: Sequence[tuple[str | Path, float]], out: str | Path,
                     vae: str | Path | None = None, dtype: torch.dtype | None = torch.float16,
                     model_config: str | Path | None = None) -> Path:
    """Bake the adapters into the base model and save it: ``out`` ending in ``.safetensors`` gives one
    A1111-layout file (in ``dtype``; SDXL in its SGM layout), anything else a diffusers folder (U-Net, text
    encoders, VAE, tokenizers, scheduler) that diffusers tools — and ``lycolab train`` — load."""
    from lycolab.models.export import export_single_file, save_diffusers_folder
    from lycolab.networks.merge import merge_files
    from lycolab.training.sampling import sampling_pipeline

    parts = load_stable_diffusion(model, vae, config=model_config)
    merge_files(parts.unet, parts.text_encoders, networks)
    if str(out).lower().endswith(".safetensors"):
        if parts.is_sdxl:
            from lycolab.models.export_sdxl import export_sdxl_single_file

            return export_sdxl_single_file(parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2, out,
                                           dtype)
        return export_single_file(parts.unet, parts.vae, parts.text_encoder, out, dtype)
    return save_diffusers_folder(sampling_pipeline(parts, parts.noise_scheduler), Path(out))
