"""Which Stable Diffusion family a model on disk belongs to — SD 1.x, SD 2.x or SDXL — without loading a weight.

Training, sampling, merging and the estimate all branch on the family, and users should not have to say what their
checkpoint is: sd-scripts needs a separate script (``sdxl_train_network.py``) and ``--v2``; we read it off the files.
A diffusers folder says it in ``model_index.json`` (and has ``text_encoder_2/`` for SDXL); a single ``.safetensors``
says it in its header's key names, read without touching the tensors; a ``.ckpt`` in its key names too, read by
torch's ``weights_only`` unpickler with the tensors memory-mapped (nothing is read into RAM, no code can run).
"""

from __future__ import annotations

import json
from pathlib import Path

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"
FAMILY_NAMES = {SD1: "SD 1.x", SD2: "SD 2.x", SDXL: "SDXL"}
# original-layout (LDM / SGM) key prefixes that only one family's text encoders have
SDXL_TEXT_KEY = "conditioner.embedders.1.model."
SDXL_UNET_KEY = "model.diffusion_model.label_emb."
SD2_TEXT_KEY = "cond_stage_model.model."


def model_family(model: str | Path) -> str | None:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` for a diffusers folder or a ``.safetensors`` checkpoint; None when the
    files do not say (a hub id not yet downloaded, a pickled ``.ckpt``, something else)."""
    path = Path(str(model))
    if path.is_dir():
        return _folder_family(path)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return family_from_keys(_header_keys(path))
    if path.is_file() and path.suffix.lower() in (".ckpt", ".pt", ".pth"):
        return family_from_keys(_checkpoint_keys(path))
    return None


def is_sdxl_unet(unet) -> bool:
    """SDXL's U-Net is the one with added text_time conditioning (pooled text and size/crop numbers)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def family_from_keys(keys) -> str | None:
    """The family of an original-layout checkpoint from its key names (None when it is not a whole model)."""
    keys = list(keys)
    if any(key.startswith((SDXL_TEXT_KEY, SDXL_UNET_KEY)) for key in keys):
        return SDXL
    if any(key.startswith(SD2_TEXT_KEY) for key in keys):
        return SD2
    if any(key.startswith("model.diffusion_model.") for key in keys):
        return SD1
    return None


def _folder_family(folder: Path) -> str | None:
    index = folder / "model_index.json"
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "") if index.is_file() else ""
    except (OSError, ValueError, AttributeError):
        class_name = ""
    if "XL" in class_name or (folder / "text_encoder_2").is_dir():
        return SDXL
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(unet, dict):
        return None
    if unet.get("addition_embed_type") == "text_time":
        return SDXL
    return SD2 if unet.get("cross_attention_dim") == 1024 else SD1


def _header_keys(path: Path) -> list[str]:
    """The tensor names of a ``.safetensors`` (its JSON header); empty when the header is unreadable."""
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= 100 * 2**20:
                return []
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return []
    return [key for key in header if key != "__metadata__"] if isinstance(header, dict) else []


def _checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a PyTorch checkpoint (``state_dict`` nested or not); empty when torch refuses it (a pickle
    that needs code) or it is not a zip-format checkpoint."""
    import pickle

    import torch

    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError, AttributeError, TypeError):
        return []
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
    return [key for key in state if isinstance(key, str)] if isinstance(state, dict) else []
