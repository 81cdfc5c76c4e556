"""lycolab names an SDXL LoRA's layers exactly as sd-scripts does.

``tests/data/sd_scripts_sdxl_lora_names.toml`` holds the ``lora_name`` of every module sd-scripts' own
``networks/lora.py`` ``LoRANetwork(is_sdxl=True)`` creates for its ``SdxlUNet2DConditionModel`` and two text encoders
(with and without ``conv_dim``), produced by running that code; ``scripts/sd_scripts_sdxl_names.py`` regenerates it:
``python scripts/sd_scripts_sdxl_names.py --git-dir <sd-scripts clone> > tests/data/sd_scripts_sdxl_lora_names.toml``.
Here the real SDXL base 1.0 diffusers U-Net and text encoder configs are built on the meta device (instant, nothing
downloaded) and lycolab's target names for them compared with that list, set for set, along with which layers get the
conv (kxk) rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
import torch

from lycolab.networks.naming import text_encoder_targets, unet_targets

DATA = tomllib.loads((Path(__file__).resolve().parent / "data" / "sd_scripts_sdxl_lora_names.toml")
                    .read_text(encoding="utf-8"))
SD_UNET = set(DATA["unet"]["names"])
SD_UNET_CONV = SD_UNET | set(DATA["unet_conv_extra"]["names"])
SD_TE = set(DATA["te1"]["names"]) | set(DATA["te2"]["names"])
SD_KXK = set(DATA["conv_kxk"]["names"])

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the keys that shape the module tree)
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP bigG/14)
TE1_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TE2_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


@pytest.fixture(scope="module")
def text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return [CLIPTextModel(CLIPTextConfig(**TE1_CONFIG)), CLIPTextModelWithProjection(CLIPTextConfig(**TE2_CONFIG))]


def _names(targets) -> list[str]:
    return [target.lora_name for target in targets]


def test_the_data_is_sd_scripts_sdxl_network():
    assert len(DATA["commit"]) == 40
    assert (len(SD_UNET), len(SD_UNET_CONV), len(DATA["te1"]["names"]), len(DATA["te2"]["names"])) == \
        (722, 788, 72, 192)
    assert SD_KXK <= SD_UNET_CONV - SD_UNET


@pytest.mark.parametrize("include_conv_blocks", [False, True], ids=["linear", "conv_dim"])
def test_unet_names_equal_sd_scripts(unet, include_conv_blocks):
    targets = unet_targets(unet, include_conv_blocks)
    names = _names(targets)
    assert len(names) == len(set(names))
    expected = SD_UNET_CONV if include_conv_blocks else SD_UNET
    assert {"missing": sorted(expected - set(names)), "extra": sorted(set(names) - expected)} == \
        {"missing": [], "extra": []}
    assert sorted(target.lora_name for target in targets if target.is_conv_kxk) == sorted(SD_KXK & expected)


def test_lycoris_preset_on_sdxl_targets_sd_scripts_conv_set(unet):
    targets = unet_targets(unet, include_conv_blocks=True, lycoris_preset=True)
    names = _names(targets)
    assert len(names) == len(set(names))
    assert {"missing": sorted(SD_UNET_CONV - set(names)), "extra": sorted(set(names) - SD_UNET_CONV)} == \
        {"missing": [], "extra": []}
    assert sorted(target.lora_name for target in targets if target.is_conv_kxk) == sorted(SD_KXK)


def test_text_encoder_names_equal_sd_scripts(text_encoders):
    targets = text_encoder_targets(text_encoders)
    names = _names(targets)
    assert len(names) == len(set(names))
    assert {"missing": sorted(SD_TE - set(names)), "extra": sorted(set(names) - SD_TE)} == {"missing": [], "extra": []}
    assert not any(target.is_conv_kxk for target in targets)
