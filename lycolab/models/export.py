"""Writing a diffusers SD 1.x model back to one original-layout (LDM) ``.safetensors`` that A1111 and ComfyUI load.

Our own key mapping, written from the two layouts: the U-Net's diffusers blocks map to LDM's numbered
``input_blocks`` / ``middle_block`` / ``output_blocks``, the VAE's to ``encoder.down.N.block.M`` (decoder blocks in
reverse order, attention projections as 1x1 convs), and the CLIP text encoder sits under
``cond_stage_model.transformer.text_model``. The test suite exports the tiny model and loads the file back with
diffusers' own single-file loader to prove the mapping.

Both exports — the single file and a diffusers folder — appear only when complete (the previous one stays until
then), get the umask's file modes so other users' A1111/ComfyUI can read them, and a full disk is one line.
"""

from __future__ import annotations

import errno
from pathlib import Path

import torch

from lycolab.files import WriteError, atomic_directory, save_safetensors

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
UNET_RESNET_NAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION_NAMES = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def unet_block_map(config) -> list[tuple[str, str, str]]:
    """(diffusers prefix, LDM prefix, kind) for every block of a diffusers SD U-Net config."""
    per_block, count = config.layers_per_block, len(config.block_out_channels)
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    pairs = [("time_embedding.linear_1.", "time_embed.0.", "plain"), ("time_embedding.linear_2.", "time_embed.2.",
             "plain"), ("conv_in.", "input_blocks.0.0.", "plain"), ("conv_norm_out.", "out.0.", "plain"),
             ("conv_out.", "out.2.", "plain")]
    for block in range(count):
        for layer in range(per_block):
            index = 1 + block * (per_block + 1) + layer
            pairs += [(f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{index}.0.", "resnet"),
                      (f"down_blocks.{block}.attentions.{layer}.", f"input_blocks.{index}.1.", "plain")]
        if block < count - 1:
            index = 1 + block * (per_block + 1) + per_block
            pairs.append((f"down_blocks.{block}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", "plain"))
    pairs += [("mid_block.resnets.0.", "middle_block.0.", "resnet"), ("mid_block.attentions.0.", "middle_block.1.",
              "plain"), ("mid_block.resnets.1.", "middle_block.2.", "resnet")]
    for block, block_type in enumerate(config.up_block_types):
        has_attention = "CrossAttn" in block_type
        for layer in range(per_block + 1):
            index = block * (per_block + 1) + layer
            pairs += [(f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{index}.0.", "resnet"),
                      (f"up_blocks.{block}.attentions.{layer}.", f"output_blocks.{index}.1.", "plain")]
        if block < count - 1:
            index = block * (per_block + 1) + per_block
            position = 2 if has_attention else 1
            pairs.append((f"up_blocks.{block}.upsamplers.0.conv.", f"output_blocks.{index}.{position}.conv.",
                          "plain"))
    return pairs


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    return _rename(state_dict, unet_block_map(config), UNET_PREFIX, UNET_RESNET_NAMES)


def vae_block_map(config) -> list[tuple[str, str, str]]:
    count = len(config.block_out_channels)
    pairs = []
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in.", f"{side}.conv_in.", "plain"), (f"{side}.conv_out.", f"{side}.conv_out.",
                  "plain"), (f"{side}.conv_norm_out.", f"{side}.norm_out.", "plain"),
                  (f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", "resnet"),
                  (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", "resnet"),
                  (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", "attention")]
    for block in range(count):
        pairs += [(f"encoder.down_blocks.{block}.resnets.{layer}.", f"encoder.down.{block}.block.{layer}.", "resnet")
                  for layer in range(config.layers_per_block)]
        pairs.append((f"encoder.down_blocks.{block}.downsamplers.0.conv.", f"encoder.down.{block}.downsample.conv.",
                      "plain"))
        ldm_block = count - 1 - block
        pairs += [(f"decoder.up_blocks.{block}.resnets.{layer}.", f"decoder.up.{ldm_block}.block.{layer}.", "resnet")
                  for layer in range(config.layers_per_block + 1)]
        pairs.append((f"decoder.up_blocks.{block}.upsamplers.0.conv.", f"decoder.up.{ldm_block}.upsample.conv.",
                      "plain"))
    pairs += [("quant_conv.", "quant_conv.", "plain"), ("post_quant_conv.", "post_quant_conv.", "plain")]
    return pairs


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    renamed = _rename(state_dict, vae_block_map(config), VAE_PREFIX, (("conv_shortcut", "nin_shortcut"),),
                      VAE_ATTENTION_NAMES)
    # LDM's VAE attention projections are 1x1 convolutions.
    return {key: value[:, :, None, None] if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight",
            "v.weight", "proj_out.weight")) and value.dim() == 2 else value for key, value in renamed.items()}


def text_encoder_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x's CLIP text encoder (transformers 5 drops the ``text_model.`` level; LDM files keep it)."""
    return {TEXT_PREFIX + (key if key.startswith("text_model.") else f"text_model.{key}"): value
            for key, value in state_dict.items()}


def export_single_file(unet, vae, text_encoder, path: str | Path, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write the three models as one LDM-layout ``.safetensors`` (atomically), in ``dtype`` (None keeps them)."""
    if getattr(unet.config, "cross_attention_dim", 768) == 1024:
        raise ValueError("exporting SD 2.x (OpenCLIP text encoder) to a single file is not supported yet; keep the "
                         "diffusers folder")
    tensors = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config),
               **text_encoder_to_ldm(text_encoder.state_dict())}
    tensors = {key: (value.to(dtype) if dtype is not None and value.is_floating_point() else value)
               .detach().cpu().contiguous() for key, value in tensors.items()}
    return save_safetensors(path, tensors, {"format": "pt"})


def save_diffusers_folder(pipeline, out: str | Path) -> Path:
    """``pipeline.save_pretrained(out)`` made atomic: written into a hidden folder and renamed into place whole.

    A folder that holds something other than a diffusers model is refused rather than replaced, since replacing
    it would delete the files in it.
    """
    out = Path(out)
    foreign = out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file()
    if out.is_file() or foreign:
        raise WriteError(f"{out}: already exists and is not a diffusers model folder; choose a new folder for the "
                         "model (nothing was written)", errno.EEXIST, out)
    return atomic_directory(out, lambda folder: pipeline.save_pretrained(folder, safe_serialization=True))


def _rename(state_dict: dict[str, torch.Tensor], block_map: list[tuple[str, str, str]], prefix: str,
            resnet_names: tuple[tuple[str, str], ...], attention_names: tuple[tuple[str, str], ...] = ()
            ) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state_dict.items():
        match = next(((source, target, kind) for source, target, kind in block_map if key.startswith(source)), None)
        if match is None:
            raise ValueError(f"no original-layout name for {key}; is this an SD 1.x model?")
        source, target, kind = match
        rest = key[len(source):]
        names = resnet_names if kind == "resnet" else attention_names if kind == "attention" else ()
        for diffusers_name, ldm_name in names:
            if rest.startswith(diffusers_name + "."):
                rest = ldm_name + rest[len(diffusers_name):]
                break
        renamed[prefix + target + rest] = value
    return renamed
