"""Writing a diffusers SDXL model back to one original-layout (SGM) ``.safetensors`` that A1111 and ComfyUI load.

SDXL's single files use Stability's ``sgm`` layout: the U-Net under ``model.diffusion_model.`` in the same LDM
block numbering as SD 1.x (so :mod:`lycolab.models.export`'s map serves, plus SDXL's size/crop embedding
``add_embedding`` → ``label_emb.0``), the VAE under ``first_stage_model.`` exactly as SD 1.x, CLIP ViT-L under
``conditioner.embedders.0.transformer.text_model.`` in transformers' names, and OpenCLIP bigG under
``conditioner.embedders.1.model.`` in OpenCLIP's own names: ``transformer.resblocks.N`` with q, k and v fused into
one ``attn.in_proj_weight``, and ``text_projection`` stored as the matrix that multiplies from the right (the
transpose of transformers' ``text_projection.weight``). The test suite exports the tiny SDXL and loads the file back
with diffusers' own single-file loader to prove the mapping tensor for tensor.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from lycolab.files import save_safetensors
from lycolab.models.export import (
    TEXT_PREFIX,
    UNET_PREFIX,
    UNET_RESNET_NAMES,
    _rename,
    text_encoder_to_ldm,
    unet_block_map,
    vae_to_ldm,
)

TEXT_ENCODER_1_PREFIX = "conditioner.embedders.0.transformer."
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
ADD_EMBEDDING_MAP = [("add_embedding.linear_1.", "label_emb.0.0.", "plain"),
                     ("add_embedding.linear_2.", "label_emb.0.2.", "plain")]
OPEN_CLIP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER_NAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                         "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
# CLIP's temperature: OpenCLIP training clamps it at ln(100), which is where bigG ends. Text-to-image never uses it,
# but SGM's embedder module has the parameter and ComfyUI reports it missing when a file lacks it.
CLIP_LOGIT_SCALE = math.log(100.0)


def export_sdxl_single_file(unet, vae, text_encoder, text_encoder_2, path: str | Path,
                            dtype: torch.dtype | None = torch.float16) -> Path:
    """Write the four SDXL models as one SGM-layout ``.safetensors`` (atomically), in ``dtype`` (None keeps them).

    A model that is not SDXL is refused with a one-line ValueError before anything is written, because a file
    with SD 1.x parts under SDXL names would load in A1111 and fail only at generation time.
    """
    check_sdxl_parts(unet, text_encoder, text_encoder_2)
    tensors = {**sdxl_unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config),
               **clip_l_to_sgm(text_encoder), **open_clip_to_sgm(text_encoder_2.state_dict())}
    tensors = {key: (value.to(dtype) if dtype is not None and value.is_floating_point() else value)
               .detach().cpu().contiguous() for key, value in tensors.items()}
    return save_safetensors(path, tensors, {"format": "pt"})


def check_sdxl_parts(unet, text_encoder, text_encoder_2) -> None:
    """Raise a one-line ValueError naming the first part that does not have SDXL's shape."""
    embed_type = getattr(unet.config, "addition_embed_type", None)
    if embed_type != "text_time":
        raise ValueError(f"not an SDXL U-Net: its addition_embed_type is {embed_type!r}, SDXL's is 'text_time' "
                         "(export SD 1.x with export_single_file)")
    if hasattr(text_encoder, "text_projection"):
        raise ValueError(f"text_encoder is a {type(text_encoder).__name__}; SDXL's first text encoder is a "
                         "CLIPTextModel (CLIP ViT-L, no projection)")
    if not hasattr(text_encoder_2, "text_projection"):
        raise ValueError(f"text_encoder_2 is a {type(text_encoder_2).__name__}; SDXL's second text encoder is a "
                         "CLIPTextModelWithProjection (OpenCLIP bigG)")
    widths = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    if unet.config.cross_attention_dim != widths:
        raise ValueError(f"the U-Net's cross_attention_dim is {unet.config.cross_attention_dim} but the two text "
                         f"encoders' widths add up to {widths}; SDXL's U-Net attends to both, concatenated")


def sdxl_unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The SD 1.x block map serves SDXL's U-Net as is; only the size/crop embedding (``label_emb``) is new."""
    block_map = unet_block_map(config) + ADD_EMBEDDING_MAP
    sources = tuple(source for source, _, _ in block_map)
    stray = next((key for key in state_dict if not key.startswith(sources)), None)
    if stray is not None:
        raise ValueError(f"no SDXL original-layout name for the U-Net weight {stray}; is this an SDXL base U-Net?")
    return _rename(state_dict, block_map, UNET_PREFIX, UNET_RESNET_NAMES)


def clip_l_to_sgm(text_encoder) -> dict[str, torch.Tensor]:
    """CLIP ViT-L in transformers' names, as SD 1.x, under SGM's first embedder.

    ``position_ids`` is a buffer transformers no longer saves, but real SDXL files (and ComfyUI's own SDXL saves)
    carry it, and loaders built on older transformers expect it.
    """
    tensors = {TEXT_ENCODER_1_PREFIX + key.removeprefix(TEXT_PREFIX): value
               for key, value in text_encoder_to_ldm(text_encoder.state_dict()).items()}
    positions = text_encoder.config.max_position_embeddings
    tensors[f"{TEXT_ENCODER_1_PREFIX}text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return tensors


def open_clip_to_sgm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection``'s weights in OpenCLIP's names, under SGM's second embedder."""
    tensors: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("text_model.")
        layer = LAYER_KEY.fullmatch(name)
        if name in OPEN_CLIP_NAMES:
            tensors[OPEN_CLIP_NAMES[name]] = value
        elif name == "text_projection.weight":  # OpenCLIP computes x @ text_projection, a Linear computes x @ W.T
            tensors["text_projection"] = value.t()
        elif layer and layer[2] in QKV:
            fused.setdefault(f"transformer.resblocks.{layer[1]}.attn.in_proj_{layer[3]}", {})[layer[2]] = value
        elif layer and layer[2] in OPEN_CLIP_LAYER_NAMES:
            tensors[f"transformer.resblocks.{layer[1]}.{OPEN_CLIP_LAYER_NAMES[layer[2]]}.{layer[3]}"] = value
        else:
            raise ValueError(f"no OpenCLIP name for the second text encoder's weight {key}; is it SDXL's bigG?")
    # torch.nn.MultiheadAttention keeps q, k and v as one matrix, in that order
    tensors.update({name: torch.cat([parts[projection] for projection in QKV]) for name, parts in fused.items()})
    tensors["logit_scale"] = torch.tensor(CLIP_LOGIT_SCALE, dtype=tensors["ln_final.weight"].dtype)
    return {TEXT_ENCODER_2_PREFIX + key: value for key, value in tensors.items()}
