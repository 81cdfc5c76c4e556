"""Loading a base model for training: a diffusers folder, a hub id (online), or a single original-layout
``.safetensors`` / ``.ckpt`` (A1111-style), with an optional VAE swap — SD 1.x, 2.x or SDXL, told apart by the files
themselves (:mod:`lycolab.models.detect`).

Model files are large and often arrive damaged (a download or a Drive copy that stopped). Whatever is wrong with
them, loading ends in a :class:`ModelLoadError` of one line naming the file and the fix, never in a traceback from
deep inside diffusers or transformers: the files those will read are checked first (every JSON parses, every
``.safetensors`` header describes the whole file), and whatever the libraries still raise is reported the same way.
Pickles (``.ckpt``/``.pt``/``.bin``) are read only by torch's ``weights_only`` unpickler, which refuses code.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from lycolab.models.detect import SDXL, is_sdxl_unet, model_family

logger = logging.getLogger(__name__)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# The diffusers folders lycolab loads; the tokenizers have no config.json, the others need one.
MODEL_PARTS = ("unet", "text_encoder", "vae", "tokenizer")
SDXL_MODEL_PARTS = MODEL_PARTS + ("text_encoder_2", "tokenizer_2")


class ModelLoadError(ValueError):
    """A base model or VAE that cannot be loaded; the message names the path and the fix."""


@dataclass
class StableDiffusionParts:
    """A loaded model. SDXL has a second text encoder (OpenCLIP bigG with projection) and tokenizer; SD 1.x/2.x
    leave them None."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """Every text encoder, in the order adapter files number them (``lora_te1_``, ``lora_te2_``)."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def models(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]


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
        for model_part in parts.text_encoders + [parts.unet]:
            _place(model_part, device, dtype)
        _place(parts.vae, device)
        return parts
    sdxl = path.is_dir() and model_family(path) == SDXL
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json or unet/); check the "
                                 "path")
        check_model_folder(path, SDXL_MODEL_PARTS if sdxl else MODEL_PARTS)
    if vae:
        vae_model = _load_vae(vae)
    try:
        unet = _place(UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", variant=weights_variant(path / "unet")), device, dtype)
        text_encoder = _place(CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", variant=weights_variant(path / "text_encoder")), device, dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        sdxl = sdxl or is_sdxl_unet(unet)  # a hub id
        second = _load_second_encoder(source, path, device, dtype) if sdxl else (None, None)
        if not vae:
            vae_model = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=weights_variant(path / "vae"))
    except MemoryError:
        raise
    except Exception as error:  # the libraries raise anything for a bad model; it is the file's fault
        raise ModelLoadError(f"{source}: cannot load the model ({_first_line(error)}); download it (again: it may "
                             "be incomplete) with lycolab download") from None
    _hint_v_parameterization(unet, source, v_parameterization)
    return StableDiffusionParts(unet, _place(vae_model, device), text_encoder, tokenizer,
                                training_scheduler(v_parameterization), *second)


def _load_second_encoder(source: str, path: Path, device, dtype) -> tuple[torch.nn.Module, object]:
    """SDXL's OpenCLIP bigG text encoder (with its projection, for the pooled embedding) and its tokenizer."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    encoder = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2",
                                                          variant=weights_variant(path / "text_encoder_2"))
    return _place(encoder, device, dtype), CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2")


def check_model_folder(folder: Path, parts: tuple[str, ...] = MODEL_PARTS) -> None:
    """Raise a ModelLoadError naming the first damaged file of a diffusers folder, before any library reads it.

    An interrupted download or copy leaves JSON that does not parse, ``.safetensors`` cut short, or no
    ``config.json`` at all (transformers then builds a default-sized model and fails on the weights with a message
    about sizes). Only the files ``from_pretrained`` reads are checked: other variants (``*.fp16.safetensors``) are
    left alone.
    """
    if (folder / "model_index.json").is_file():
        _check_json(folder / "model_index.json")
    for part in parts:
        check_model_part(folder / part, needs_config=not part.startswith("tokenizer"))
    for tokenizer in (part for part in parts if part.startswith("tokenizer")):
        _check_vocabulary(folder / tokenizer)


def _check_vocabulary(folder: Path) -> None:
    """Without its vocabulary transformers still builds a CLIP tokenizer, one that turns every word into the unknown
    token: training would run on empty prompts without a word of warning."""
    if not (folder / "tokenizer.json").is_file() and not (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise ModelLoadError(f"{folder}: no tokenizer.json (or vocab.json and merges.txt), so every word would be "
                             "unknown; download the model again")


_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def weights_variant(folder: Path) -> str | None:
    """The variant (``fp16``) of a component folder that holds only variant weights, as ``lycolab download
    --variant fp16`` leaves it: ``from_pretrained`` finds variant files only when told their variant. None when
    plain weights are there (or the folder is not local)."""
    if not folder.is_dir():
        return None
    weights = [path.name.split(".") for path in folder.iterdir()
               if path.suffix in (".safetensors", ".bin") and path.name.split(".")[0].split("-")[0] in _WEIGHT_STEMS]
    if any(len(parts) == 2 for parts in weights):
        return None
    variants = {parts[1].split("-")[0] for parts in weights if len(parts) == 3}
    return variants.pop() if len(variants) == 1 else None


def check_model_part(folder: Path, needs_config: bool = True) -> None:
    """One component folder (``unet/``, a VAE folder): its config, every JSON, the weight files ``from_pretrained``
    will read (the plain ones, or the variant's when only a variant is there)."""
    if needs_config and not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder / 'config.json'}: missing; download the model again")
    for file in sorted(folder.glob("*.json")):
        _check_json(file)
    variant = weights_variant(folder)
    for file in sorted(folder.glob("*.safetensors")):
        parts = file.name.split(".")
        if len(parts) == 2 or (variant is not None and len(parts) == 3 and parts[1] == variant):
            check_safetensors(file)


def check_safetensors(path: Path) -> None:
    """A ``.safetensors`` whose header is unreadable or does not describe the whole file is damaged or incomplete."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: damaged or incomplete ({_first_line(error)}); download it again") from None


def _check_json(path: Path) -> None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({_first_line(error)}); the model is damaged or incomplete: "
                             "download it again") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: holds a {type(value).__name__}, not a JSON object; the model is damaged: "
                             "download it again")


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

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{path}: not a model checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}) or folder")
    if path.suffix.lower() == ".safetensors":
        check_safetensors(path)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    sdxl = model_family(path) == SDXL or (config is not None and model_family(config) == SDXL)
    extra = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipeline = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_single_file(
            str(path), config=str(config) if config else None, local_files_only=offline, **extra)
    except MemoryError:
        raise
    except Exception as error:  # diffusers raises anything for a bad checkpoint
        raise ModelLoadError(_single_file_problem(path, error, config)) from None
    _hint_v_parameterization(pipeline.unet, str(path), v_parameterization)
    vae_model = _load_vae(vae) if vae else pipeline.vae
    second = (pipeline.text_encoder_2, pipeline.tokenizer_2) if sdxl else (None, None)
    return StableDiffusionParts(pipeline.unet, vae_model, pipeline.text_encoder, pipeline.tokenizer,
                                training_scheduler(v_parameterization), *second)


def _single_file_problem(path: Path, error: Exception, config: str | Path | None) -> str:
    """What went wrong with a checkpoint, and the fix: a refused pickle, a damaged file, or the wrong kind of file."""
    import zipfile

    if _refused_pickle(error):
        return (f"{path}: this {path.suffix} contains pickled code and was refused (loading it could run anything); "
                "convert it to .safetensors with a trusted tool first")
    if path.suffix.lower() != ".safetensors" and not zipfile.is_zipfile(path):
        return (f"{path}: damaged or incomplete (not a PyTorch checkpoint archive: {_first_line(error)}); download "
                "it again")
    if config:
        return (f"{path}: cannot load the checkpoint ({_first_line(error)}); is it a whole SD/SDXL checkpoint "
                f"(not a LoRA or a VAE) of the same type as {config}?")
    return (f"{path}: cannot load the checkpoint ({_first_line(error)}); offline, give the config of a diffusers "
            "folder of the same model type")


def is_v2(unet) -> bool:
    """SD 2.x U-Nets attend to 1024-wide OpenCLIP states and use linear projections in their transformers (as
    SDXL's do, which the added text_time conditioning tells apart)."""
    if is_sdxl_unet(unet):
        return False
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


def _first_line(error: BaseException) -> str:
    """The first line of a library's message, cut short: some quote whole configs or file lists."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _load_vae(vae: str | Path):
    from diffusers import AutoencoderKL

    path = Path(vae)
    if path.is_file():
        if path.suffix.lower() == ".safetensors":
            check_safetensors(path)
        try:
            return AutoencoderKL.from_single_file(str(path))  # .ckpt is read with weights_only=True by diffusers
        except MemoryError:
            raise
        except Exception as error:  # diffusers raises anything for a bad file
            reason = "it contains pickled code and was refused" if _refused_pickle(error) else _first_line(error)
            raise ModelLoadError(f"{path}: cannot load this VAE file ({reason}); convert it to .safetensors or a "
                                 "diffusers VAE folder first") from None
    subfolder = "vae" if (path / "vae").is_dir() else None
    if path.is_dir():
        check_model_part(path / subfolder if subfolder else path)
    try:
        return AutoencoderKL.from_pretrained(str(vae), subfolder=subfolder)
    except MemoryError:
        raise
    except Exception as error:  # as above
        raise ModelLoadError(f"{vae}: cannot load this VAE ({_first_line(error)}); download it (again: it may be "
                             "incomplete) with lycolab download") from None
