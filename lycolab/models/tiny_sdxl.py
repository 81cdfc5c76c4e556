"""A tiny but architecturally faithful SDXL, built in code with a fixed seed.

Like :mod:`lycolab.models.tiny` for SD 1.x, it uses the very classes a real SDXL checkpoint loads into: diffusers'
``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` (pooled text plus six size/crop numbers), a
first down block without attention and deeper transformer stacks below it, linear projections; transformers'
``CLIPTextModel`` (CLIP ViT-L's place) and ``CLIPTextModelWithProjection`` (OpenCLIP bigG's, whose projected EOS
state is the pooled embedding); the SD VAE with SDXL's latent scale. Only the widths are small, so adapter key
names, conditioning and training code are the real thing. Its weights are random (there is no pretrained tiny
SDXL): it proves plumbing and file formats, the SD 1.x tiny model proves learning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lycolab.models.tiny import TINY_MAX_TOKENS, TINY_SEED, build_tiny_scheduler, build_tiny_tokenizer, build_tiny_vae

TINY_TE1_WIDTH = 32
TINY_TE2_WIDTH = 48
TINY_TIME_EMBED_DIM = 8  # SDXL: 256 per size/crop number
SDXL_VAE_SCALING_FACTOR = 0.13025


@dataclass
class TinySDXL:
    """The parts of an SDXL model, as training and sampling use them."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object
    scheduler: object


def build_tiny_sdxl_text_encoders(vocab_size: int):
    """CLIP-L's stand-in (quick_gelu, no projection) and bigG's (gelu, with the text projection), 4 layers each."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(width: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=TINY_MAX_TOKENS,
                              hidden_act=act, projection_dim=width, bos_token_id=vocab_size - 2,
                              eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)

    return CLIPTextModel(config(TINY_TE1_WIDTH, "quick_gelu")), CLIPTextModelWithProjection(config(TINY_TE2_WIDTH,
                                                                                                    "gelu"))


def build_tiny_sdxl_unet(v_prediction: bool = False):
    """SDXL's block pattern at small widths: DownBlock2D then cross-attention blocks with 1 and 2 transformer
    layers, the mirrored up blocks, text_time added conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        norm_num_groups=8,
        cross_attention_dim=TINY_TE1_WIDTH + TINY_TE2_WIDTH,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TINY_TE2_WIDTH + 6 * TINY_TIME_EMBED_DIM,
        upcast_attention=False,
    )


def build_tiny_sdxl(seed: int = TINY_SEED, v_prediction: bool = False) -> TinySDXL:
    """Build all parts deterministically: the same seed gives bit-identical weights on every machine."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        tokenizer_2 = build_tiny_tokenizer()
        tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!", not with EOS as CLIP-L's does
        text_encoder, text_encoder_2 = build_tiny_sdxl_text_encoders(len(tokenizer))
        unet = build_tiny_sdxl_unet(v_prediction)
        vae = build_tiny_vae()
    finally:
        torch.random.set_rng_state(generator_state)
    vae.register_to_config(scaling_factor=SDXL_VAE_SCALING_FACTOR)
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval()
    return TinySDXL(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                    build_tiny_scheduler(v_prediction))


def save_tiny_sdxl(directory: str | Path, seed: int = TINY_SEED, v_prediction: bool = False) -> Path:
    """Write the tiny SDXL as a diffusers folder that ``StableDiffusionXLPipeline.from_pretrained`` loads offline."""
    return save_tiny_sdxl_parts(build_tiny_sdxl(seed, v_prediction), directory)


def save_tiny_sdxl_parts(parts: TinySDXL, directory: str | Path) -> Path:
    from diffusers import StableDiffusionXLPipeline

    from lycolab.models.export import save_diffusers_folder

    pipeline = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                         text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                         tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=parts.scheduler)
    return save_diffusers_folder(pipeline, Path(directory))
