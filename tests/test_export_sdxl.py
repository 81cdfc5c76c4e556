"""SDXL single-file (SGM-layout) export: diffusers' own single-file loader reads every tensor back unchanged, the
OpenCLIP half is in OpenCLIP's conventions, and models that are not SDXL are refused before anything is written."""

import pytest
import torch
from safetensors.torch import load_file

from lycolab.models.detect import family_from_keys
from lycolab.models.export_sdxl import TEXT_ENCODER_2_PREFIX, export_sdxl_single_file
from lycolab.models.tiny_sdxl import build_tiny_sdxl, save_tiny_sdxl_parts

PART_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny SDXL, its diffusers folder (the loader's config), and a float32 export of different weights, so
    that what loads back can only have come from the file."""
    root = tmp_path_factory.mktemp("sdxl")
    parts = build_tiny_sdxl()
    folder = save_tiny_sdxl_parts(parts, root / "folder")
    with torch.no_grad():
        for name in PART_NAMES:
            for parameter in getattr(parts, name).parameters():
                parameter.mul_(1.05).add_(0.01)
    path = export_sdxl_single_file(*(getattr(parts, name) for name in PART_NAMES), root / "xl.safetensors",
                                   dtype=None)
    return parts, folder, path


def test_diffusers_single_file_loader_reads_back_every_tensor_exactly(exported):
    from diffusers import StableDiffusionXLPipeline

    parts, folder, path = exported
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in PART_NAMES:
        expected, got = getattr(parts, name).state_dict(), getattr(loaded, name).state_dict()
        assert got.keys() == expected.keys(), name
        different = [key for key in expected if not torch.equal(got[key], expected[key])]
        assert not different, f"{name}: {different[:5]}"


def test_the_file_is_recognised_as_sdxl(exported):
    assert family_from_keys(load_file(exported[2]).keys()) == "sdxl"


def test_openclip_text_projection_multiplies_from_the_right(exported):
    parts, _, path = exported
    projection = load_file(path)[TEXT_ENCODER_2_PREFIX + "text_projection"]
    pooled = torch.randn(3, parts.text_encoder_2.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(pooled @ projection, parts.text_encoder_2.text_projection(pooled))


def test_fused_attention_weights_compute_what_clip_attention_computes(exported):
    """OpenCLIP's resblocks are torch.nn.MultiheadAttention, so the fused q/k/v must work there unchanged."""
    parts, _, path = exported
    config, tensors = parts.text_encoder_2.config, load_file(path)
    prefix = TEXT_ENCODER_2_PREFIX + "transformer.resblocks.0.attn."
    attention = torch.nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
    attention.load_state_dict({key.removeprefix(prefix): value for key, value in tensors.items()
                               if key.startswith(prefix)})
    states = torch.randn(2, 5, config.hidden_size)
    with torch.no_grad():
        expected = parts.text_encoder_2.text_model.encoder.layers[0].self_attn(states)[0]
        torch.testing.assert_close(attention(states, states, states, need_weights=False)[0], expected)


def test_default_export_is_half_precision_with_integer_position_ids(exported, tmp_path):
    parts = exported[0]
    path = export_sdxl_single_file(*(getattr(parts, name) for name in PART_NAMES), tmp_path / "half.safetensors")
    tensors = load_file(path)
    position_ids = tensors.pop("conditioner.embedders.0.transformer.text_model.embeddings.position_ids")
    assert position_ids.dtype == torch.int64 and position_ids.tolist() == [list(range(position_ids.shape[1]))]
    assert {value.dtype for value in tensors.values()} == {torch.float16}


def test_an_sd1_model_is_refused_in_one_line_before_writing(tmp_path):
    from lycolab.models.tiny import build_tiny_sd

    sd = build_tiny_sd(pretrained=False)
    path = tmp_path / "sd1.safetensors"
    with pytest.raises(ValueError, match="not an SDXL U-Net: its addition_embed_type is None") as error:
        export_sdxl_single_file(sd.unet, sd.vae, sd.text_encoder, sd.text_encoder, path)
    assert "\n" not in str(error.value)
    assert not path.exists()


def test_a_second_text_encoder_without_projection_is_refused(exported, tmp_path):
    parts = exported[0]
    with pytest.raises(ValueError, match="text_encoder_2 is a CLIPTextModel;.*CLIPTextModelWithProjection"):
        export_sdxl_single_file(parts.unet, parts.vae, parts.text_encoder, parts.text_encoder, tmp_path / "x")
    assert not (tmp_path / "x").exists()
