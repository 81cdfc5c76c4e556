"""Which modules an adapter wraps and what they are called in files (kohya / LyCORIS conventions).

A1111, ComfyUI, diffusers and the LyCORIS package find weights by these names, so they are a file format, not a
style choice: ``lora_unet_`` / ``lora_te_`` plus the diffusers module path with dots replaced by underscores, for SD
1.x/2.x. For SDXL, sd-scripts trains its own original-layout (SGM) U-Net, so its files — and the SDXL LoRAs A1111 and
ComfyUI users share — name U-Net layers by that layout (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
``..._output_blocks_2_0_in_layers_2``) and the text encoders ``lora_te1_`` / ``lora_te2_``: we write those names, and
read both them and the diffusers-layout names LyCORIS writes for a diffusers SDXL U-Net.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lycolab.models.detect import is_sdxl_unet

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# LyCORIS' default "full" preset also adapts the time embedding MLP and the first and last convs (by name: SDXL's
# added-conditioning MLP, also a TimestepEmbedding, is not among them).
LYCORIS_EXTRA_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
# SDXL's added-conditioning MLP in sd-scripts' layout (the rest of the U-Net maps as in an SD checkpoint)
SDXL_EXTRA_PATHS = (("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"))
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
# Class names of diffusers modules that sd-scripts' own U-Nets (library/original_unet.py, sdxl_original_unet.py) call
# otherwise: LyCORIS presets and module_algo_map name classes as LyCORIS sees them under sd-scripts.
SD_SCRIPTS_CLASS_NAMES = {"Attention": "CrossAttention"}
# diffusers containers sd-scripts' SDXL U-Net has no module for (its blocks are plain ModuleLists / Sequentials)
SDXL_MISSING_CLASSES = ("TimestepEmbedding", "Timesteps", "CrossAttnDownBlock2D", "DownBlock2D",
                        "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D")
# sd-scripts' SDXL U-Net paths whose GroupNorm is its GroupNorm32 subclass (ResNet norms and the output norm)
SDXL_GROUPNORM32 = re.compile(r"(^|\.)(in_layers|out_layers)\.0$|^out\.0$")


@dataclass(frozen=True)
class TargetModule:
    """A Linear or Conv2d to wrap, with its file name and whether it gets the conv (3x3) rank."""

    lora_name: str
    module: nn.Module
    is_conv_kxk: bool


def text_encoder_prefix(index: int, count: int) -> str:
    """``lora_te`` for SD 1.x/2.x's single encoder, ``lora_te1``/``lora_te2`` when there are several."""
    return TEXT_ENCODER_PREFIX if count == 1 else f"{TEXT_ENCODER_PREFIX}{index + 1}"


def lora_name(prefix: str, module_path: str) -> str:
    return f"{prefix}.{module_path}".replace(".", "_")


def canonical_named_modules(root: nn.Module):
    """``named_modules()`` with the paths files use, whatever the library version.

    transformers 5 dropped the ``text_model`` level of ``CLIPTextModel``; every existing file (and A1111/ComfyUI)
    names ``text_model.encoder.layers...``, so that level is put back in the names. An SDXL U-Net's modules get
    sd-scripts' original-layout paths (:func:`sgm_paths`); the few without one (parameterless helpers) keep theirs.
    """
    prefix = ""
    if type(root).__name__ == "CLIPTextModel" and not hasattr(root, "text_model"):
        prefix = "text_model."
    renamed = sgm_paths(root) if is_sdxl_unet(root) else {}
    for path, module in root.named_modules():
        yield renamed.get(path, prefix + path if path else path), module


def sd_scripts_class_name(module: nn.Module, file_path: str, sdxl: bool) -> str | None:
    """The class name this module has in the model sd-scripts builds (None: no such module there), which is what
    LyCORIS' class-name targets meet when it runs under sd-scripts. Text encoders are transformers' own classes."""
    name = type(module).__name__
    if sdxl:
        if name in SDXL_MISSING_CLASSES:
            return None
        if name == "GroupNorm" and SDXL_GROUPNORM32.search(file_path):
            return "GroupNorm32"
        if name == "UNet2DConditionModel":
            return "SdxlUNet2DConditionModel"
    return SD_SCRIPTS_CLASS_NAMES.get(name, name)


def sgm_paths(unet: nn.Module) -> dict[str, str]:
    """Every diffusers module path of an SDXL U-Net → the path of the same layer in sd-scripts' original-layout
    U-Net (``down_blocks.1.attentions.0.proj_in`` → ``input_blocks.4.1.proj_in``, ``up_blocks.0.resnets.0.conv1`` →
    ``output_blocks.0.0.in_layers.2``): the block numbering of an SD checkpoint, which the export already knows."""
    from lycolab.models.export import UNET_RESNET_NAMES, unet_block_map

    blocks = unet_block_map(unet.config)
    paths = dict(SDXL_EXTRA_PATHS)
    for path, _ in unet.named_modules():
        if path in paths:
            continue
        match = next(((source, target, kind) for source, target, kind in blocks if (path + ".").startswith(source)),
                     None)
        if match is None:
            continue
        source, target, kind = match
        rest = (path + ".")[len(source):]
        for diffusers_name, sgm_name in UNET_RESNET_NAMES if kind == "resnet" else ():
            if rest.startswith(diffusers_name + "."):
                rest = sgm_name + rest[len(diffusers_name):]
                break
        paths[path] = (target + rest).rstrip(".")
    return paths


def find_targets(root: nn.Module, prefix: str, block_types: tuple[str, ...], names: tuple[str, ...] = ()
                 ) -> list[TargetModule]:
    """Linear and Conv2d layers inside blocks of the given class names, or at the given (diffusers) paths, without
    duplicates, under their file names."""
    file_paths = {id(module): path for path, module in canonical_named_modules(root)}
    found: dict[str, TargetModule] = {}
    for block_path, block in root.named_modules():
        if block_path in names:
            _add_target(found, prefix, file_paths[id(block)], block)
        if type(block).__name__ not in block_types:
            continue
        for child in block.modules():
            _add_target(found, prefix, file_paths[id(child)], child)
    return list(found.values())


def _add_target(found: dict[str, TargetModule], prefix: str, path: str, module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        name = lora_name(prefix, path)
        is_kxk = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
        found.setdefault(name, TargetModule(name, module, is_kxk))


def unet_targets(unet: nn.Module, include_conv_blocks: bool, lycoris_preset: bool = False) -> list[TargetModule]:
    """The U-Net layers an adapter wraps.

    kohya's ``networks.lora``: attention blocks, plus ResNet/down/up-sample blocks when a conv rank is set.
    LyCORIS (``lycoris.kohya``, preset "full"): all of those plus the time embedding, ``conv_in`` and ``conv_out``
    (not on SDXL, as under sd-scripts); which of them get an adapter then depends on the conv rank (kxk convs need
    ``conv_dim > 0``).
    """
    if lycoris_preset:
        # LyCORIS' "full" preset (lycolab.networks.presets); under sd-scripts its names meet an SDXL U-Net's
        # original-layout paths, where they match nothing
        from lycolab.networks.presets import BUILTIN_PRESETS, preset_targets

        return [TargetModule(target.lora_name, target.module, target.is_conv_kxk)
                for target in preset_targets(BUILTIN_PRESETS["full"], unet, [])
                if isinstance(target.module, (nn.Linear, nn.Conv2d))]
    blocks = UNET_ATTENTION_BLOCKS + (UNET_CONV_BLOCKS if include_conv_blocks else ())
    return find_targets(unet, UNET_PREFIX, blocks)


def text_encoder_targets(text_encoders: list[nn.Module]) -> list[TargetModule]:
    """CLIP attention and MLP projections of every text encoder."""
    targets = []
    for index, encoder in enumerate(text_encoders):
        targets += find_targets(encoder, text_encoder_prefix(index, len(text_encoders)), TEXT_ENCODER_BLOCKS)
    return targets
