"""Which modules an adapter wraps and what they are called in files (kohya / LyCORIS conventions).

A1111, ComfyUI, diffusers and the LyCORIS package find weights by these names, so they are a file format, not a
style choice: ``lora_unet_`` / ``lora_te_`` plus the diffusers module path with dots replaced by underscores.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# LyCORIS' default "full" preset also adapts the time embedding MLP and the first and last convs.
LYCORIS_EXTRA_BLOCKS = ("TimestepEmbedding",)
LYCORIS_EXTRA_NAMES = ("conv_in", "conv_out")
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


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
    names ``text_model.encoder.layers...``, so that level is put back in the names.
    """
    prefix = ""
    if type(root).__name__ == "CLIPTextModel" and not hasattr(root, "text_model"):
        prefix = "text_model."
    for path, module in root.named_modules():
        yield (prefix + path if path else path), module


def find_targets(root: nn.Module, prefix: str, block_types: tuple[str, ...], names: tuple[str, ...] = ()
                 ) -> list[TargetModule]:
    """Linear and Conv2d layers inside blocks of the given class names, or at the given paths, without duplicates."""
    found: dict[str, TargetModule] = {}
    for block_path, block in canonical_named_modules(root):
        if block_path in names:
            _add_target(found, prefix, block_path, block)
        if type(block).__name__ not in block_types:
            continue
        for child_path, child in block.named_modules():
            _add_target(found, prefix, f"{block_path}.{child_path}" if block_path else child_path, child)
    return list(found.values())


def _add_target(found: dict[str, TargetModule], prefix: str, path: str, module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        name = lora_name(prefix, path)
        is_kxk = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
        found.setdefault(name, TargetModule(name, module, is_kxk))


def unet_targets(unet: nn.Module, include_conv_blocks: bool, lycoris_preset: bool = False) -> list[TargetModule]:
    """The U-Net layers an adapter wraps.

    kohya's ``networks.lora``: attention blocks, plus ResNet/down/up-sample blocks when a conv rank is set.
    LyCORIS (``lycoris.kohya``, preset "full"): all of those plus the time embedding, ``conv_in`` and ``conv_out``;
    which of them get an adapter then depends on the conv rank (kxk convs need ``conv_dim > 0``).
    """
    if lycoris_preset:
        blocks = UNET_ATTENTION_BLOCKS + UNET_CONV_BLOCKS + LYCORIS_EXTRA_BLOCKS
        return find_targets(unet, UNET_PREFIX, blocks, LYCORIS_EXTRA_NAMES)
    blocks = UNET_ATTENTION_BLOCKS + (UNET_CONV_BLOCKS if include_conv_blocks else ())
    return find_targets(unet, UNET_PREFIX, blocks)


def text_encoder_targets(text_encoders: list[nn.Module]) -> list[TargetModule]:
    """CLIP attention and MLP projections of every text encoder."""
    targets = []
    for index, encoder in enumerate(text_encoders):
        targets += find_targets(encoder, text_encoder_prefix(index, len(text_encoders)), TEXT_ENCODER_BLOCKS)
    return targets
