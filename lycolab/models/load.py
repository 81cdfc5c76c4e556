"""Loading a base model for training: a diffusers folder, a hub id (online), or a single original-layout
``.safetensors`` / ``.ckpt`` (A1111-style), with an optional VAE swap."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


class ModelLoadError(ValueError):
    """A base model or VAE that cannot be loaded; the message names the path and the fix."""


@dataclass
class StableDiffusionParts:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object


def load_stable_diffusion(model: str | Path, vae: str | Path | None = None, v_parameterization: bool = False,
                          config: str | Path | None = None, device: torch.device | str | None = None,
                          dtype: torch.dtype | None = None) -> StableDiffusionParts:
    """U-Net, VAE, text encoder and tokenizer from a diffusers folder, hub id or single file, plus sd-scripts' DDPM
    schedule.

    ``config`` is the diffusers folder (or hub id) holding the configs a single-file checkpoint needs offline.
    ``device`` (sd-scripts' ``lowram``) moves each part there as soon as it is loaded, the U-Net and text encoder
    cast to ``dtype``, so RAM never holds the whole model at once (the VAE stays float32: it overflows in fp16).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = str(model)
    path = Path(source)
    if path.is_file():
        parts = load_single_file(path, vae, v_parameterization, config)
        for model_part, part_dtype in ((parts.unet, dtype), (parts.text_encoder, dtype), (parts.vae, None)):
            _place(model_part, device, part_dtype)
        return parts
    if path.is_dir() and not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json or unet/); check the path")
    try:
        unet = _place(UNet2DConditionModel.from_pretrained(source, subfolder="unet"), device, dtype)
        text_encoder = _place(CLIPTextModel.from_pretrained(source, subfolder="text_encoder"), device, dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        vae_model = _place(_load_vae(vae) if vae else AutoencoderKL.from_pretrained(source, subfolder="vae"), device)
    except OSError as error:
        raise ModelLoadError(f"{source}: cannot load the model ({_first_line(error)}); download it first") from None
    _hint_v_parameterization(unet, source, v_parameterization)
    return StableDiffusionParts(unet, vae_model, text_encoder, tokenizer, training_scheduler(v_parameterization))


def _place(model: torch.nn.Module, device: torch.device | str | None, dtype: torch.dtype | None = None
           ) -> torch.nn.Module:
    return model if device is None else model.to(device, dtype)


def _hint_v_parameterization(unet, name: str, v_parameterization: bool) -> None:
    if is_v2(unet) and not v_parameterization:
        logger.info("%s: an SD 2.x model; if it is a 768-v model (e.g. v2-1_768), set v_parameterization = true",
                    Path(name).name)


def training_scheduler(v_parameterization: bool = False):
    """sd-scripts' DDPM noise schedule (SD 1.x/2.x), epsilon or v-prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, prediction_type="v_prediction" if v_parameterization else "epsilon",
    )


def load_single_file(path: str | Path, vae: str | Path | None = None, v_parameterization: bool = False,
                     config: str | Path | None = None) -> StableDiffusionParts:
    """An A1111-style checkpoint through diffusers' single-file loader.

    ``.ckpt`` files are read with ``torch.load(weights_only=True)`` (diffusers does so), so a file that needs code
    unpickled is refused with advice to convert it. The component configs come from ``config`` (a diffusers folder
    of the same model type) or, online, from the hub repo diffusers picks for the checkpoint.
    """
    import os

    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{path}: not a model checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}) or folder")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        pipeline = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config) if config else None, local_files_only=offline, safety_checker=None,
            requires_safety_checker=False)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError) as error:
        if _refused_pickle(error):
            raise ModelLoadError(f"{path}: this .ckpt contains pickled code and was refused (loading it could run "
                                 "anything); convert it to .safetensors with a trusted tool first") from None
        raise ModelLoadError(f"{path}: cannot load the checkpoint ({_first_line(error)}); offline, give the "
                             "config of a diffusers folder of the same model type") from None
    _hint_v_parameterization(pipeline.unet, str(path), v_parameterization)
    vae_model = _load_vae(vae) if vae else pipeline.vae
    return StableDiffusionParts(pipeline.unet, vae_model, pipeline.text_encoder, pipeline.tokenizer,
                                training_scheduler(v_parameterization))


def is_v2(unet) -> bool:
    """SD 2.x U-Nets attend to 1024-wide OpenCLIP states and use linear projections in their transformers."""
    return unet.config.cross_attention_dim == 1024 or bool(getattr(unet.config, "use_linear_projection", False))


def is_v2_checkpoint(keys) -> bool:
    """An original-layout checkpoint with the OpenCLIP text encoder (``cond_stage_model.model.*``) is SD 2.x."""
    return any(key.startswith("cond_stage_model.model.") for key in keys)


def _refused_pickle(error: BaseException | None) -> bool:
    """Whether torch's weights_only unpickler refused the file, anywhere in the chain of causes."""
    while error is not None:
        if isinstance(error, pickle.UnpicklingError) or "weights only load failed" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_vae(vae: str | Path):
    from diffusers import AutoencoderKL

    path = Path(vae)
    if path.is_file():
        try:
            return AutoencoderKL.from_single_file(str(path))  # .ckpt is read with weights_only=True by diffusers
        except (pickle.UnpicklingError, RuntimeError, OSError, ValueError) as error:
            reason = "it contains pickled code and was refused" if _refused_pickle(error) else _first_line(error)
            raise ModelLoadError(f"{path}: cannot load this VAE file ({reason}); convert it to .safetensors or a "
                                 "diffusers VAE folder first") from None
    subfolder = "vae" if (path / "vae").is_dir() else None
    return AutoencoderKL.from_pretrained(str(vae), subfolder=subfolder)
