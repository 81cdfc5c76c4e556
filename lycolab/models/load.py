"""Loading a base model for training: a diffusers folder (hub ids when online), with an optional VAE swap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


class ModelLoadError(ValueError):
    """A base model or VAE that cannot be loaded; the message names the path and the fix."""


@dataclass
class StableDiffusionParts:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object


def load_stable_diffusion(model: str | Path, vae: str | Path | None = None, v_parameterization: bool = False
                          ) -> StableDiffusionParts:
    """U-Net, VAE, text encoder and tokenizer from a diffusers folder or hub id, plus sd-scripts' DDPM schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = str(model)
    path = Path(source)
    if path.is_file():
        raise ModelLoadError(
            f"{path}: single-file checkpoints are not supported in this version; use a diffusers folder "
            "(e.g. one saved by StableDiffusionPipeline.save_pretrained)"
        )
    if path.is_dir() and not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json or unet/); check the path")
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        vae_model = _load_vae(vae) if vae else AutoencoderKL.from_pretrained(source, subfolder="vae")
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"{source}: cannot load the model ({first_line}); download it first") from None
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, prediction_type="v_prediction" if v_parameterization else "epsilon",
    )
    return StableDiffusionParts(unet, vae_model, text_encoder, tokenizer, scheduler)


def _load_vae(vae: str | Path):
    from diffusers import AutoencoderKL

    path = Path(vae)
    if path.is_file():
        raise ModelLoadError(f"{path}: single-file VAEs are not supported in this version; use a diffusers VAE folder")
    subfolder = "vae" if (path / "vae").is_dir() else None
    return AutoencoderKL.from_pretrained(str(vae), subfolder=subfolder)
