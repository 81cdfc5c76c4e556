"""An estimate before training: how many steps, how long each takes on this GPU, how much VRAM the run needs against
what the GPU has, and whether it all fits one Colab session — shown by notebooks 05 and 06 before anything slow starts.

Everything here is an **estimate**, built without loading a single weight:

* **steps** are lycolab's own plan (:func:`lycolab.training.loop.plan_run` on the same bucketed dataset the trainer
  builds), so they are exact;
* **time per step** comes from :data:`DEVICES`, a table of published (or derived, or rough — each entry says which)
  speeds for SD 1.5 LoRA training at 512 px, batch 1, fp16, with memory-efficient attention and cached latents,
  scaled by the factors documented next to each constant below;
* **VRAM** is parameter counts × bytes (the frozen U-Net, text encoder(s) and VAE in the dtypes the training loop
  keeps them in; the adapter with its gradients and optimizer state) plus activations per latent pixel (constants
  counted on the SD 1.5 and SDXL U-Nets, documented at :data:`ACTIVATION_KIB_PER_LATENT_PIXEL` and
  :data:`SDXL_ACTIVATION_KIB_PER_LATENT_PIXEL`) plus the CUDA context, at the larger of two moments: caching latents
  (every model still on the GPU, the VAE encoding) and training (text encoders gone when their outputs are cached).
  Parameters are counted on the ``meta`` device: the U-Net, text encoder(s) and VAE are built from their configs (the
  model folder's own, else the known SD 1.x / 2.x / SDXL configs: the family :func:`lycolab.models.detect.model_family`
  reads off the files, or ``family``, or ``v2``) and the adapter is made by :func:`lycolab.networks.create_network`
  on them, so its count is exact. Nothing is downloaded.

Counts and datasets are cached, so showing the estimate again in a notebook is fast.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lycolab.config import ConfigError, TrainConfig, network_args_dict, plain
from lycolab.display import ShownAsTable, Table
from lycolab.models.detect import FAMILY_NAMES, SD1, SD2, SDXL, model_family

GIB = 2**30
KIB = 2**10
REFERENCE_PIXELS = 512 * 512  # the table's speeds are for one 512x512 image per step


# ---------------------------------------------------------------------------------------------------- the devices


@dataclass(frozen=True)
class DeviceSpec:
    """One kind of device: its training speed for the reference workload and what it holds.

    ``iterations_per_second``: SD 1.5 LoRA (dim 32, U-Net and text encoder trained), 512x512, batch 1, fp16 mixed
    precision, xformers/SDPA attention, latents cached, no gradient checkpointing. ``memory_gib``: the capacity torch
    reports (what a run can use, before the CUDA context); None where memory is the machine's RAM. ``session_hours``:
    how long one Colab session on it usually lasts. ``fp32_slowdown``: how much slower ``mixed_precision = "no"`` is.
    ``quality``: "derived" (from a published number, arithmetic in the comment) or "rough" (no number found).
    """

    name: str
    iterations_per_second: float
    memory_gib: float | None
    session_hours: float | None
    fp32_slowdown: float = 2.0
    native_bf16: bool = True
    quality: str = "rough"


# Sessions. Colab's FAQ (https://research.google.com/colaboratory/faq.html): "In the version of Colab that is free of
# charge notebooks can run for at most 12 hours", usage limits "fluctuate" and free GPU access is "heavily
# restricted"; the limit is not published. Free-T4 users report a few hours a day — hollowstrawberry's LoRA guide
# (https://civitai.com/models/22530): "for free for a few hours a day (some say it's 20 hours a week)". So 4 h is
# rough. Paid runtimes "last up to 24 hours" (Colab, https://github.com/googlecolab/colabtools/issues/4648), while
# compute units last. A CPU runtime is a free one: the 12 h maximum.
FREE_T4_SESSION_HOURS = 4.0  # rough
PAID_SESSION_HOURS = 24.0
FREE_CPU_SESSION_HOURS = 12.0

DEVICES: dict[str, DeviceSpec] = {
    # T4, 2.0 it/s (derived). hollowstrawberry/kohya-colab#67 (https://github.com/hollowstrawberry/kohya-colab/issues/67):
    # on a Colab T4, SD 1.5 LoRA dim 32, batch 2, fp16, xformers, cache_latents, 2000 steps "around 25-30 minutes"
    # including setup -> <= 0.8-0.9 s per batch-2 step, which this module's batch scaling (below) gives for 2.0 it/s
    # at batch 1 (0.5 s x 1.85 = 0.93 s). Cross-check: the Hugging Face LoRA blog (https://huggingface.co/blog/lora):
    # SD 1.5 LoRA, 512, batch 1, fp16, 15000 steps x 4 accumulation = 60000 batches "about 5 hours in a 2080 Ti"
    # = 3.3 it/s, and a T4 runs SD at roughly 0.6x a 2080 Ti. 14.75 GiB: "GPU 0; 14.75 GiB total capacity" in T4 OOM
    # messages (e.g. https://github.com/huggingface/diffusers/issues/4360). No native bf16 (Turing).
    "T4": DeviceSpec("T4", 2.0, 14.75, FREE_T4_SESSION_HOURS, native_bf16=False, quality="derived"),
    # L4, 3.5 it/s (rough): no training number found. Ada, about 1.9x the T4's fp16 tensor throughput at similar memory
    # bandwidth. 22.0 GiB (24 GB card; rough).
    "L4": DeviceSpec("L4", 3.5, 22.0, PAID_SESSION_HOURS),
    # V100, 4.5 it/s (derived, rough). Google's SD 1.5 benchmark (vertex-ai-samples, community-content/
    # vertex_model_garden/benchmarking_reports/stable_diffusion_v1-5_benchmarking_report.md): 4 images at 512 px in
    # 4.1 s on a V100 vs 12.6 s on a T4 = 3.1x under a saturating load; batch-1 training saturates less: ~2.25x the T4.
    # 15.77 GiB (16 GB; rough). No native bf16 (Volta).
    "V100": DeviceSpec("V100", 4.5, 15.77, PAID_SESSION_HOURS, native_bf16=False),
    # A100, 6.0 it/s (derived). The same Google report: SD 1.5 LoRA rank 8, batch 4, 512 px, gradient checkpointing on
    # one A100 40GB: "about 11 minutes for 1k steps" = 0.66 s/step -> /1.3 without checkpointing = 0.51 s -> batch 1 by
    # the scaling below: 0.14 s (7 it/s); batch 1 uses an A100 poorly, so 6. 39.39 GiB: "GPU 0; 39.39 GiB total
    # capacity" in A100-40GB OOM messages. fp32 matmuls use TF32 cores there, so fp32 costs less (1.7x, rough).
    "A100-40GB": DeviceSpec("A100-40GB", 6.0, 39.39, PAID_SESSION_HOURS, fp32_slowdown=1.7, quality="derived"),
    "A100-80GB": DeviceSpec("A100-80GB", 6.0, 79.15, PAID_SESSION_HOURS, fp32_slowdown=1.7, quality="derived"),
    # H100, 9.0 it/s (rough): ~1.5x an A100 for this small, launch-bound workload; no SD 1.5 training number found.
    "H100": DeviceSpec("H100", 9.0, 79.11, PAID_SESSION_HOURS, fp32_slowdown=1.7),
    # P100, 1.0 it/s (rough): no tensor cores; "on p100 I got half the speed of t4" for SD generation
    # (https://github.com/TheLastBen/fast-stable-diffusion/issues/7). fp16 is only 2x its fp32 rate: 1.5x.
    "P100": DeviceSpec("P100", 1.0, 15.89, PAID_SESSION_HOURS, fp32_slowdown=1.5, native_bf16=False),
    # CPU (also where an Apple GPU would be: the loop trains on the CPU whenever CUDA is missing), 0.054 it/s
    # (derived, at fp32): docs/benchmarks.md measures 4.61 s per SD 1.5 LoRA step at 256 px, batch 1,
    # fp32 on 2 cores (a Colab CPU runtime's count) -> 4x the pixels at 512 px = 18.4 s. Measured in fp32 already, so
    # fp32_slowdown is 1. fp16 falls back to fp32 on the CPU (the training loop does so); bf16 runs, speed unknown.
    "CPU": DeviceSpec("CPU", 1 / 18.4, None, FREE_CPU_SESSION_HOURS, fp32_slowdown=1.0, quality="derived"),
}
DEVICE_ALIASES = {"A100": "A100-40GB", "A100-40G": "A100-40GB", "A100-80G": "A100-80GB"}
UNKNOWN_GPU_SPEED = "T4"  # a GPU not in the table is assumed to train at this one's speed (with a note saying so)

# Time factors (each multiplies the seconds per step):
# * pixels: a step costs FIXED_STEP_SHARE of the batch-1 time whatever its size (optimizer step, text encoder, kernel
#   launches), the rest grows linearly with batch x width x height. Rough; it fits the T4 numbers above (a batch of 2
#   costing ~1.85x a batch of 1).
FIXED_STEP_SHARE = 0.15
# * gradient checkpointing runs each block's forward again during backward: about a third more work (Chen et al.
#   2016, "Training Deep Nets with Sublinear Memory Cost": ~30% overhead). 1.3x.
GRADIENT_CHECKPOINTING_SLOWDOWN = 1.3
# * without cache_latents the VAE encodes every batch, in fp32 (the loop keeps the VAE in fp32): 1.25x (rough).
UNCACHED_LATENTS_SLOWDOWN = 1.25
# * the algorithm: measured step times relative to LoRA on the SD 1.5 U-Net (docs/benchmarks.md, CPU: lora 4.61 s,
#   locon 4.79 s, loha 6.13 s, lokr 5.25 s); the GPU ratios are assumed the same (rough).
ALGORITHM_SLOWDOWN = {"lora": 1.0, "locon": 1.04, "loha": 1.33, "lokr": 1.14}
# * fp32 (mixed_precision = "no") on a GPU: DeviceSpec.fp32_slowdown (T4 2x: 8.1 TFLOPS fp32 vs 65 fp16 on tensor
#   cores, rough). bf16 on a GPU without native bf16 (T4, V100, P100) is taken as fp32 speed (rough).
# * SDXL: one step at 1024x1024, batch 1, costs 4.4x the table's SD 1.5 step at 512 px (derived, rough).
#   huggingface/diffusers#4470 (https://github.com/huggingface/diffusers/pull/4470, comment of 2023-08-08): on a free
#   Colab T4, train_dreambooth_lora_sdxl.py with the README's dog settings (U-Net LoRA, text embeddings precomputed,
#   1024 px, batch 1 x 4 gradient accumulation, fp16, gradient checkpointing, 8-bit Adam) ran 500 steps in "~1h30m":
#   2000 images in 5400 s = 2.7 s per image, validation included -> 2.1 s without checkpointing (/1.3) = 4.2x the
#   T4's 0.5 s; 4.4 for a single report. Cross-check, an upper bound: torch.utils.flop_counter on the meta device
#   counts 6.76 TFLOP for SDXL's U-Net forward at 128x128 latents and 0.80 for SD 1.5's at 64x64 (8.4x), but batch-1
#   SD 1.5 at 512 px keeps a GPU far less busy than SDXL at 1024 px does. By the pixel scaling above, 4.4x at 4x the
#   pixels is SDXL_PIXEL_COST = 1.25x SD 1.5's time per latent pixel.
SDXL_STEP_TIME_AT_1024 = 4.4
SDXL_PIXEL_COST = (SDXL_STEP_TIME_AT_1024 - FIXED_STEP_SHARE) / ((1 - FIXED_STEP_SHARE) * 4)
# Loading the model and caching latents before the first step: ~5 minutes on Colab (rough), counted for the session.
SETUP_SECONDS = 300


# ------------------------------------------------------------------------------------------------- memory constants

# The CUDA context (driver, cuBLAS/cuDNN handles and kernels) takes ~0.5 GiB outside torch's allocator.
CUDA_CONTEXT_GIB = 0.5
# Activations autograd keeps per latent pixel (one position of the (H/8)x(W/8) latent) of one image, in KiB, for the
# SD 1.5 U-Net with networks.lora attached (SDPA attention). Derived by counting the bytes of every distinct tensor
# saved for backward (torch.autograd.graph.saved_tensors_hooks; weights excluded) in one training forward on the CPU,
# at 32x32 and 48x48 latents (the count is linear in pixels: 451 and 447 KiB/px in fp32; SD 2.x: the same 451).
# * fp32: 450. * fp16/bf16 mixed precision: 280 — under CUDA autocast the GroupNorm/LayerNorm inputs and SiLU inputs
#   (23% of those bytes) stay fp32, the rest is fp16.
# * gradient checkpointing: the block inputs kept (74 KiB/px in fp32, ~38 in fp16) plus the largest block run again
#   during backward (40 KiB/px in fp32, ~25 in fp16): 115 fp32, 63 mixed.
# So a 512x512 image (4096 latent pixels) needs ~1.1 GiB in fp16, ~0.25 GiB with gradient checkpointing.
ACTIVATION_KIB_PER_LATENT_PIXEL = {(False, 4): 450.0, (False, 2): 280.0, (True, 4): 115.0, (True, 2): 63.0}
# The same count with the other algorithms, relative to LoRA (loha 471, locon 459, lokr 649 KiB/px in fp32).
ACTIVATION_ALGORITHM_FACTOR = {"lora": 1.0, "locon": 1.02, "loha": 1.04, "lokr": 1.44}
# The caching allocator's fragmentation and the backward pass's gradient buffers on top of the saved tensors (rough).
ACTIVATION_MARGIN = 1.15
# The SD 1.x/2.x U-Net's activation width per latent pixel, which the constants above are for: the channels of each
# resolution level weighted by its share of the pixels (320 + 640/4 + 1280/16 + 1280/64) x layers_per_block 2. Another
# U-Net (the tiny demo model) is scaled by its own value of this (rough).
SD_ACTIVATION_WIDTH = (320 + 640 / 4 + 1280 / 16 + 1280 / 64) * 2
# The same count for the SDXL base U-Net (2.57 B parameters) with networks.lora dim 32 attached, by the same method
# (derived: counted on the CPU, not measured on a GPU): 855 and 827 KiB/px in fp32 at 32x32 and 48x48 latents, i.e.
# 804 KiB/px plus ~51 MiB whatever the size (the cross-attention keys and values of the 77 tokens): ~807 at 1024 px.
# Per latent pixel SDXL keeps ~1.8x SD 1.5: no attention at the top level, but 2 and 10 transformer layers below.
# * fp32: 810. * fp16/bf16 mixed precision: 495 — norm and SiLU inputs are 16% of the bytes (fp32 under autocast),
#   the rest fp16, plus the fp16 copy autocast makes of a LayerNorm output for each LoRA that reads it (q, k, v: 25
#   KiB/px; 11 for SD 1.5, inside its margin).
# * gradient checkpointing: diffusers checkpoints each ResnetBlock2D and each BasicTransformerBlock, so the 10-layer
#   stacks cost only their inputs: the kept inputs and the unchecked layers (proj_in/proj_out and their LoRA, the
#   samplers) 67 KiB/px in fp32 (~37 in fp16) plus the largest block run again (18 fp32, ~11 fp16): 86 fp32, 48 mixed.
# The same script gives SD 1.5's 451/447 KiB/px, 23% and 63 KiB/px mixed with checkpointing above. So a 1024x1024
# image (16384 latent pixels) needs ~8.9 GiB in fp16 with the margin below, ~0.9 GiB with gradient checkpointing.
# Published figures agree in scale: kohya-ss/sd-scripts' README ("Tips for SDXL training"): "The LoRA training can
# be done with 8GB GPU memory (10GB recommended)" with U-Net only, gradient checkpointing, cached text-encoder outputs
# and latents and an 8-bit optimizer; diffusers' examples/dreambooth/README_sdxl.md: SDXL LoRA at 1024 px "with less
# than 16GB of VRAM" with gradient checkpointing, 8-bit Adam and fp16 (its text embeddings precomputed); civitai's
# SDXL 1.0 Training Overview (https://education.civitai.com/sdxl-1-0-training-overview, 2023-08): with gradient
# checkpointing "VRAM usage peaks at 13 – 14.8 GB" (settings unstated). Without checkpointing the community finds
# more than we predict: the 2ch-ai wiki's SDXL tests (https://2ch-ai.gitgud.site/wiki/tech/sdxl, sd-scripts 0.8.3,
# 2024-02) say training below 20 GB takes gradient checkpointing, where these constants give ~15-17 GiB at 1024 px.
SDXL_ACTIVATION_KIB_PER_LATENT_PIXEL = {(False, 4): 810.0, (False, 2): 495.0, (True, 4): 86.0, (True, 2): 48.0}
SDXL_ACTIVATION_WIDTH = (320 + 640 / 4 + 1280 / 16) * 2
# Encoding pixels with the VAE (fp32, no gradients) before the U-Net runs: its first block holds ~3-4 tensors of 128
# channels at full resolution, 4 bytes each: ~2 KiB per image pixel, for the images encoded at once (the batch, or
# vae_batch_size while caching latents). Only the larger of this and the U-Net's activations counts: they never
# coexist.
VAE_ENCODE_BYTES_PER_PIXEL = 2048
# Optimizer state in bytes per trainable parameter (fp32 adapter parameters):
# AdamW 2 fp32 moments; 8-bit AdamW 2 one-byte moments (bitsandbytes; its per-block scales are negligible); Lion one
# moment; SGD with Nesterov momentum one buffer; D-Adaptation Adam keeps exp_avg, exp_avg_sq and s, AdaGrad/SGD three
# buffers, Adan five, Lion two; Prodigy exp_avg, exp_avg_sq, s and the initial weights; AdaFactor factored second
# moments and no first moment (~nothing for matrices). Unknown classes (``module.Class``): assumed Adam-like.
OPTIMIZER_STATE_BYTES = {
    "adamw": 8, "adamw8bit": 2, "pagedadamw8bit": 2, "lion": 4, "lion8bit": 1, "pagedlion8bit": 1, "sgdnesterov": 4,
    "sgdnesterov8bit": 1, "dadaptation": 12, "dadaptadam": 12, "dadaptadagrad": 12, "dadaptadan": 20,
    "dadaptlion": 8, "dadaptsgd": 12, "prodigy": 16, "adafactor": 0.5,
}
EIGHT_BIT_FALLBACK = {"adamw8bit": "adamw", "pagedadamw8bit": "adamw", "lion8bit": "lion", "pagedlion8bit": "lion",
                      "sgdnesterov8bit": "sgdnesterov"}


@dataclass(frozen=True)
class ArchitectureProfile:
    """What a U-Net family costs beyond its parameters: activations per latent pixel by (gradient checkpointing,
    bytes per activation), the activation width they were counted at (a smaller U-Net of the family, such as a tiny
    one, is scaled by its own), and its time per latent pixel relative to SD 1.5's."""

    name: str
    kib_per_latent_pixel: dict[tuple[bool, int], float]
    activation_width: float
    pixel_cost: float = 1.0


SD_PROFILE = ArchitectureProfile("SD 1.x/2.x", ACTIVATION_KIB_PER_LATENT_PIXEL, SD_ACTIVATION_WIDTH)
SDXL_PROFILE = ArchitectureProfile("SDXL", SDXL_ACTIVATION_KIB_PER_LATENT_PIXEL, SDXL_ACTIVATION_WIDTH,
                                   SDXL_PIXEL_COST)
PROFILES = {SD1: SD_PROFILE, SD2: SD_PROFILE, SDXL: SDXL_PROFILE}


# --------------------------------------------------------------------------------------------- the known SD configs

SD_DOWN_BLOCKS = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
SD_UP_BLOCKS = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
SD1_UNET = {"in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": SD_DOWN_BLOCKS, "up_block_types": SD_UP_BLOCKS, "cross_attention_dim": 768,
            "attention_head_dim": 8, "sample_size": 64}
SD2_UNET = {**SD1_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True, "sample_size": 96}
SD1_TEXT_ENCODER = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "projection_dim": 768}
SD2_TEXT_ENCODER = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                    "projection_dim": 512}
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
          "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512}
# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0's unet/ and text_encoder_2/ config.json, as diffusers and
# sd-scripts' sdxl_model_util build it): a first level without attention, 1/2/10 transformer layers per block, 2048
# context channels (CLIP ViT-L's 768 + OpenCLIP bigG's 1280), the "text_time" added conditioning (bigG's 1280 pooled
# + 6 size/crop numbers x 256 = 2816): 2,567,463,684 parameters. text_encoder/ is CLIP ViT-L as in SD 1.x (123 M);
# text_encoder_2/ is OpenCLIP ViT-bigG's text tower with its projection (695 M). The VAE is SD's architecture.
SDXL_UNET = {"in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": [320, 640, 1280],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
             "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "sample_size": 128}
SDXL_TEXT_ENCODER_2 = {"architectures": ["CLIPTextModelWithProjection"], "vocab_size": 49408, "hidden_size": 1280,
                       "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                       "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
KNOWN_CONFIGS: dict[str, tuple[dict, tuple[dict, ...], dict]] = {
    SD1: (SD1_UNET, (SD1_TEXT_ENCODER,), SD_VAE),
    SD2: (SD2_UNET, (SD2_TEXT_ENCODER,), SD_VAE),
    SDXL: (SDXL_UNET, (SD1_TEXT_ENCODER, SDXL_TEXT_ENCODER_2), SD_VAE),
}


# ------------------------------------------------------------------------------------------------------ the result


@dataclass
class TrainingEstimate(ShownAsTable):
    """What a run will take — an estimate, not a measurement; ``notes`` say what to change when it does not fit."""

    steps: int
    seconds_per_step: float
    total_seconds: float
    vram_needed_gib: float
    vram_available_gib: float | None
    fits_vram: bool
    fits_session: bool
    device: str
    notes: list[str] = field(default_factory=list)
    session_hours: float | None = None
    epochs: int = 0
    steps_per_epoch: int = 0
    vram_breakdown_gib: dict[str, float] = field(default_factory=dict)

    def table(self) -> Table:
        if self.vram_available_gib is None:
            memory = ("memory", f"{_size(self.vram_needed_gib)} of RAM needed (no GPU)")
        else:
            memory = ("VRAM", f"{_size(self.vram_needed_gib)} needed of {_size(self.vram_available_gib)}: "
                      + ("fits" if self.fits_vram else "does NOT fit"))
        session = ("no limit" if self.session_hours is None else
                   f"{_duration(self.total_seconds + SETUP_SECONDS)} incl. setup, session ~{self.session_hours:g} h: "
                   + ("fits" if self.fits_session else "does NOT fit"))
        rows = [
            {"": "steps", "estimate": f"{self.steps:,} ({self.steps_per_epoch:,} per epoch x {self.epochs} epochs)"},
            {"": "time per step", "estimate": f"{self.seconds_per_step:.2f} s ({1 / self.seconds_per_step:.2f} it/s)"},
            {"": "training time", "estimate": _duration(self.total_seconds)},
            {"": memory[0], "estimate": memory[1]},
            {"": "Colab session", "estimate": session},
        ]
        parts = " + ".join(f"{name} {_size(gib)}" for name, gib in self.vram_breakdown_gib.items())
        notes = [f"{memory[0]}: {parts}"] if parts else []
        return Table(rows, title=f"Training estimate on {self.device} (an estimate, not a measurement)",
                     notes=notes + self.notes)


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 1:
        return f"{seconds:.0f} s"
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


# ------------------------------------------------------------------------------------------------------- the device


@dataclass(frozen=True)
class DeviceChoice:
    spec: DeviceSpec
    available_gib: float | None
    label: str
    is_cpu: bool
    notes: tuple[str, ...] = ()


def known_devices() -> list[str]:
    """The names :func:`estimate` accepts for ``device``."""
    return list(DEVICES)


def choose_device(device: str | None = None) -> DeviceChoice:
    """The named device (table memory), or the one this runtime has (its free memory), or the CPU."""
    if device is not None:
        key = _device_key(device)
        spec = DEVICES[key]
        return DeviceChoice(spec, spec.memory_gib, key, key == "CPU")
    return detect_device()


def _device_key(device: str) -> str:
    key = device.strip().upper()
    key = DEVICE_ALIASES.get(key, key)
    if key not in DEVICES:
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)} (or None to detect it)")
    return key


def detect_device() -> DeviceChoice:
    """The GPU torch sees, with what this process can use of it: free memory plus what torch already holds here, plus
    the CUDA context the process already has (the estimate counts it in what is needed). Without CUDA the training
    loop runs on the CPU (an Apple GPU included), so that is the device then."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        available = min((free + torch.cuda.memory_reserved(0)) / GIB + CUDA_CONTEXT_GIB, total / GIB)
        key = match_gpu_name(name, total / GIB)
        if key is None:
            note = f"{name} is not in lycolab's speed table: times assume a {UNKNOWN_GPU_SPEED}'s speed"
            spec = replace(DEVICES[UNKNOWN_GPU_SPEED], name=name, memory_gib=None, session_hours=None)
            return DeviceChoice(spec, available, name, False, (note,))
        return DeviceChoice(DEVICES[key], available, key, False)
    return DeviceChoice(DEVICES["CPU"], None, "CPU", True)


def match_gpu_name(name: str, total_gib: float | None = None) -> str | None:
    """The table key for a CUDA device name ("Tesla T4", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3")."""
    words = re.split(r"[^A-Z0-9]+", name.upper())
    if "A100" in words:
        return "A100-80GB" if "80GB" in words or (total_gib or 0) > 45 else "A100-40GB"
    return next((key for key in ("H100", "V100", "P100", "T4", "L4") if key in words), None)


# ------------------------------------------------------------------------------------------------------ the plan


def run_plan(config: TrainConfig):
    """(lycolab's own RunPlan, the BucketedDataset it was made from) — the dataset cached while its files are
    unchanged, since building one decodes every image."""
    from lycolab.training.loop import plan_run

    dataset = _dataset(config)
    if len(dataset) == 0:
        raise ConfigError("no usable images in the dataset; check image_dir and the skipped-file warnings")
    return plan_run(config, dataset), dataset


_DATASETS: dict[tuple, Any] = {}
_DATASET_CACHE_SIZE = 8


def _dataset(config: TrainConfig):
    from lycolab.data.dataset import BucketedDataset

    key = (repr(config.datasets), config.train_batch_size, _files_fingerprint(config))
    if key not in _DATASETS:
        if len(_DATASETS) >= _DATASET_CACHE_SIZE:
            _DATASETS.pop(next(iter(_DATASETS)))
        _DATASETS[key] = BucketedDataset(config.datasets, config.train_batch_size)
    return _DATASETS[key]


def _files_fingerprint(config: TrainConfig) -> tuple:
    """Every file under the image folders with its size and modification time: cheap, and any change shows."""
    entries = []
    for folder in sorted({subset.image_dir for dataset in config.datasets for subset in dataset.subsets}):
        for root, _, files in os.walk(folder):
            for name in files:
                try:
                    stat = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                entries.append((root, name, stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


# ------------------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of the frozen parts and of the adapter, and the U-Net's shape facts the estimate needs.

    ``text_encoder`` is the first (or only) text encoder, ``text_encoder_2`` SDXL's second (OpenCLIP bigG), 0 for SD
    1.x/2.x; ``family`` is "sd1", "sd2" or "sdxl", which picks the activation constants and time per pixel.
    """

    unet: int
    text_encoder: int
    vae: int
    adapter: int
    largest_adapted_weight: int
    activation_width: float
    latent_downscale: int
    text_encoder_2: int = 0
    family: str = SD1

    @property
    def text_encoders(self) -> int:
        return self.text_encoder + self.text_encoder_2


@dataclass(frozen=True)
class ModelConfigs:
    """The configs the counts are built from: the U-Net's, one per text encoder (two for SDXL), the VAE's; the family
    they belong to, and a note when they had to be assumed."""

    family: str
    unet: dict
    text_encoders: tuple[dict, ...]
    vae: dict
    note: str | None = None


def model_configs(config: TrainConfig, family: str | None = None) -> ModelConfigs:
    """The model's configs, and its family.

    Read from a diffusers folder (the model's own, or ``model_config``), or from the local hub cache for a hub id —
    never downloaded. A single-file checkpoint, or anything else, gets the known configs of its family: what
    :func:`lycolab.models.detect.model_family` reads off the files (a folder's ``model_index.json`` or configs, a
    ``.safetensors`` header's key names), else ``family`` (for a model that is not on this machine yet, such as an
    SDXL hub id before step 02 downloads it), else SD 2.x with ``v2`` and SD 1.x without. Files that say otherwise win
    over ``family``, with a note.
    """
    if family is not None and family not in KNOWN_CONFIGS:
        raise ValueError(f"unknown model family {family!r}; use one of {', '.join(KNOWN_CONFIGS)} (or None)")
    found = _detected_family(config)
    if found is not None:
        chosen = SD2 if found == SD1 and config.v2 else found  # v2 = true wins over an SD 1.x reading, as ever
    else:
        chosen = family or (SD2 if config.v2 else SD1)
    note = (f"family = {family!r} was given, but the model's files say {FAMILY_NAMES[chosen]}: counted as "
            f"{FAMILY_NAMES[chosen]}") if family and family != chosen else None
    for candidate in (config.pretrained_model_name_or_path, config.model_config):
        folder = _config_folder(candidate, chosen)
        if folder is not None:
            return ModelConfigs(chosen, *folder, note)
    unet, text_encoders, vae = KNOWN_CONFIGS[chosen]
    name = config.pretrained_model_name_or_path or "no model set"
    if found is None and not (name.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth")) and Path(name).is_file()):
        reason = f'family = "{family}"' if family else "v2 = " + ("true" if config.v2 else "false")
        note = (f"{plain(name)}: no configs on this machine, so the {FAMILY_NAMES[chosen]} architecture was assumed "
                f"({reason})")
        if chosen != SDXL and "xl" in name.lower():
            note += '; for an SDXL model, estimate(config, family="sdxl") counts SDXL'
    return ModelConfigs(chosen, unet, text_encoders, vae, note)


def _detected_family(config: TrainConfig) -> str | None:
    """The family the model's files say (the model, else ``model_config``; a hub id by its cached snapshot)."""
    for candidate in (config.pretrained_model_name_or_path, config.model_config):
        if not candidate:
            continue
        if _looks_like_repo_id(candidate):
            cached = _cached_hub_file(candidate, "unet/config.json")
            found = model_family(Path(cached).parent.parent) if cached else None
        else:
            found = model_family(candidate)
        if found is not None:
            return found
    return None


def _config_folder(source: str | None, family: str) -> tuple[dict, tuple[dict, ...], dict] | None:
    """(U-Net, text encoders, VAE) configs from a diffusers folder or the hub cache; an SDXL one also has
    ``text_encoder_2/``."""
    if not source:
        return None
    parts = ("unet", "text_encoder", *(("text_encoder_2",) if family == SDXL else ()), "vae")
    folder = Path(source)
    if folder.is_dir():
        paths = [folder / part / "config.json" for part in parts]
    elif _looks_like_repo_id(source):
        paths = [_cached_hub_file(source, f"{part}/config.json") for part in parts]
    else:
        return None
    try:
        configs = [json.loads(Path(path).read_text(encoding="utf-8")) for path in paths]  # type: ignore[arg-type]
    except (OSError, TypeError, ValueError):
        return None
    return configs[0], tuple(configs[1:-1]), configs[-1]


def _looks_like_repo_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not Path(source).exists()


def _cached_hub_file(repo_id: str, filename: str) -> str | None:
    """The file from the local Hugging Face cache, if it is there; this never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an invalid repo id, an unreadable cache: no cached config
        return None
    return path if isinstance(path, str) else None


def model_counts(config: TrainConfig, family: str | None = None) -> tuple[ModelCounts, str | None]:
    """Parameter counts for the configured model and network (cached), and a note when the model was assumed;
    ``family`` as in :func:`model_configs`."""
    configs = model_configs(config, family)
    weights = config.network_weights if config.dim_from_weights else None  # else the arguments' dims count
    weights_key = _file_key(weights) if weights else None
    counts = _counts(_json(configs.unet), tuple(_json(text) for text in configs.text_encoders), _json(configs.vae),
                     _network_key(config), weights_key, configs.family)
    return counts, configs.note


def _json(value: dict) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _file_key(path: str) -> tuple[str, int] | None:
    try:
        return (path, os.stat(path).st_mtime_ns)
    except OSError:
        return None


def _network_key(config: TrainConfig) -> tuple:
    from lycolab.networks.args import network_kwargs

    kwargs = network_kwargs(config.network_module, config.network_dim, config.network_alpha,
                            network_args_dict(config), config.network_dropout)
    train_unet, train_text_encoder = not config.network_train_text_encoder_only, not config.network_train_unet_only
    return (tuple(sorted(kwargs.items())), train_unet, train_text_encoder)


@functools.lru_cache(maxsize=32)
def _counts(unet_json: str, text_jsons: tuple[str, ...], vae_json: str, network_key: tuple,
            weights_key: tuple | None, family: str = SD1) -> ModelCounts:
    """Build the models on the meta device (no memory, no weights) and the adapter on them."""
    import torch

    with torch.device("meta"):
        unet, text_encoders, vae = _meta_models(json.loads(unet_json), [json.loads(text) for text in text_jsons],
                                                json.loads(vae_json))
        adapter, largest = _adapter_size(unet, text_encoders, network_key, weights_key)
    sizes = [_parameters(encoder) for encoder in text_encoders] + [0, 0]
    return ModelCounts(
        unet=_parameters(unet), text_encoder=sizes[0], vae=_parameters(vae), adapter=adapter,
        largest_adapted_weight=largest, activation_width=activation_width(unet.config),
        latent_downscale=2 ** (len(vae.config.block_out_channels) - 1), text_encoder_2=sizes[1], family=family,
    )


def _meta_models(unet_config: dict, text_configs: list[dict], vae_config: dict):
    """The U-Net, the text encoders (CLIPTextModelWithProjection where the config's ``architectures`` says so, as
    SDXL's second does) and the VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders = []
    for text_config in text_configs:
        projected = any("WithProjection" in name for name in text_config.get("architectures") or [])
        model_class = CLIPTextModelWithProjection if projected else CLIPTextModel
        encoders.append(model_class(CLIPTextConfig.from_dict(text_config)))
    return UNet2DConditionModel.from_config(unet_config), encoders, AutoencoderKL.from_config(vae_config)


def _adapter_size(unet, text_encoders: list, network_key: tuple, weights_key: tuple | None) -> tuple[int, int]:
    """(trainable adapter parameters, the largest adapted layer's weight size), from create_network as the training
    loop calls it, or from the tensors of ``network_weights`` when the network takes its dims from that file
    (dim_from_weights)."""
    from lycolab.networks import create_network

    kwargs, train_unet, train_text_encoder = dict(network_key[0]), network_key[1], network_key[2]
    network = create_network(unet if train_unet else None, text_encoders if train_text_encoder else [], **kwargs)
    network.restore()
    largest = max((math.prod(adapter.weight_shape) for adapter in network.adapters), default=0)
    if weights_key is not None:
        return _file_parameters(weights_key[0]), largest
    return _parameters(network), largest


def _file_parameters(path: str) -> int:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys()
                   if not key.endswith(".alpha"))


def _parameters(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def activation_width(unet_config) -> float:
    """Channels per latent pixel summed over resolution levels, weighted by each level's share of the pixels."""
    channels = list(unet_config.block_out_channels)
    layers = unet_config.layers_per_block
    layers = layers if isinstance(layers, int) else sum(layers) / len(layers)
    return sum(width / 4**level for level, width in enumerate(channels)) * layers


# ---------------------------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Precision:
    """What the loop will run in on this device: bytes per frozen weight, and whether autocast is on."""

    weight_bytes: int
    mixed: bool
    slowdown: float
    note: str | None = None


def training_precision(config: TrainConfig, device: DeviceChoice) -> Precision:
    """The loop keeps the U-Net and text encoder in the mixed-precision dtype (fp16/bf16, lowram or not) and the VAE
    in fp32; on a CPU fp16 falls back to fp32 (``_make_accelerator``)."""
    spec, chosen = device.spec, config.mixed_precision
    if chosen == "fp16" and device.is_cpu:
        return Precision(4, False, 1.0, 'mixed_precision fp16 needs a GPU: on the CPU training runs in fp32 (bf16 '
                                        'works there)')
    if chosen == "no":
        note = None if device.is_cpu else (f'mixed_precision = "fp16" would be ~{spec.fp32_slowdown:g}x faster '
                                           'and need less VRAM')
        return Precision(4, False, spec.fp32_slowdown, note)
    if chosen == "bf16" and not spec.native_bf16:
        return Precision(2, True, spec.fp32_slowdown, f"the {spec.name} has no native bf16: use mixed_precision "
                                                      '"fp16" (bf16 runs at about fp32 speed there)')
    return Precision(2, True, 1.0)


def optimizer_state_bytes(config: TrainConfig, device: DeviceChoice) -> tuple[float, str | None]:
    """Bytes of optimizer state per trainable parameter, and a note when an 8-bit optimizer falls back to 32 bits."""
    name = (config.optimizer_type or "AdamW").lower()
    if name in EIGHT_BIT_FALLBACK and device.is_cpu:
        fallback = EIGHT_BIT_FALLBACK[name]
        return OPTIMIZER_STATE_BYTES[fallback], (f"optimizer_type {config.optimizer_type} needs a CUDA GPU "
                                                 f"(bitsandbytes): {fallback} (32-bit) is used here")
    if name in OPTIMIZER_STATE_BYTES:
        return OPTIMIZER_STATE_BYTES[name], None
    return OPTIMIZER_STATE_BYTES["adamw"], f"optimizer_type {config.optimizer_type}: its state assumed Adam-like"


def _algorithm(config: TrainConfig) -> str:
    return network_args_dict(config).get("algo", "lora").strip().lower() if (
        config.network_module == "lycoris.kohya") else "lora"


@dataclass(frozen=True)
class Workload:
    """The dataset as the estimate needs it: images per batch and their bucket size, for one epoch."""

    batches: list[tuple[int, int]]  # (images in the batch, pixels per image), every batch of one epoch
    largest_batch_pixels: int  # max of images x pixels over the batches (the step that needs the most memory)
    largest_batch_images: int


def workload(dataset) -> Workload:
    batches = []
    for (dataset_index, (width, height)), count in dataset.bucket_counts().items():
        size = dataset.batch_sizes[dataset_index]
        full, rest = divmod(count, size)
        batches += [(size, width * height)] * full + ([(rest, width * height)] if rest else [])
    largest = max(batches, key=lambda batch: batch[0] * batch[1])
    return Workload(batches, largest[0] * largest[1], largest[0])


def seconds_per_step(config: TrainConfig, device: DeviceChoice, load: Workload, steps_per_epoch: int,
                     counts: ModelCounts, precision: Precision) -> float:
    """One epoch's batches timed by the table and factors above, divided into its optimizer steps."""
    profile = PROFILES[counts.family]
    factor = precision.slowdown * ALGORITHM_SLOWDOWN.get(_algorithm(config), 1.0)
    factor *= min(counts.activation_width / profile.activation_width, 1.0)  # a smaller U-Net than its family's
    if config.gradient_checkpointing:
        factor *= GRADIENT_CHECKPOINTING_SLOWDOWN
    if not (config.cache_latents or config.cache_latents_to_disk):
        factor *= UNCACHED_LATENTS_SLOWDOWN
    batch_one = 1 / device.spec.iterations_per_second
    per_pixel = (1 - FIXED_STEP_SHARE) * profile.pixel_cost / REFERENCE_PIXELS
    epoch = sum(batch_one * (FIXED_STEP_SHARE + per_pixel * images * pixels) for images, pixels in load.batches)
    return epoch * factor / max(steps_per_epoch, 1)


def text_encoders_cached(config: TrainConfig) -> bool:
    """Whether the text encoders leave the GPU once their outputs are cached (the loop moves them to the CPU, as
    sd-scripts' sdxl_train_network.py does; only sampling brings them back). config.py refuses the cache with a
    text-encoder adapter; read with getattr so a config from before the option existed still works."""
    return bool(getattr(config, "cache_text_encoder_outputs", False)
                or getattr(config, "cache_text_encoder_outputs_to_disk", False))


def vram_phases(config: TrainConfig, device: DeviceChoice, load: Workload, counts: ModelCounts,
                precision: Precision, optimizer_bytes: float) -> dict[str, dict[str, float]]:
    """Bytes per part at each moment that can be the peak, by name.

    "training": the frozen models in the loop's dtypes (the text encoders only while their outputs are not cached),
    the adapter (fp32 weights + fp32 gradients + optimizer state, + an fp16 copy under autocast), the U-Net's
    activations (or, without cached latents, the VAE encoding each batch when that is larger), the CUDA context.
    Before it, with cached latents, "caching latents": every model still on the GPU (the loop caches latents before
    the text encoders' outputs, and only then moves the text encoders off) and the adapter's weights (its gradients
    and optimizer state come with the first step) while the VAE encodes ``vae_batch_size`` images; with only the
    text-encoder outputs cached, "caching text-encoder outputs": the same without the VAE's work.
    """
    adapter_bytes = counts.adapter * (4 + 4 + optimizer_bytes + (2 if precision.mixed else 0))
    algo = _algorithm(config)
    if algo in ("loha", "lokr"):  # merged-weight buffers (lycolab.networks.merged_weight.WORKSPACE), ~3 slots
        adapter_bytes += 3 * counts.largest_adapted_weight * 4
    profile = PROFILES[counts.family]
    latent_pixels = load.largest_batch_pixels / counts.latent_downscale**2
    key = (config.gradient_checkpointing, 2 if precision.mixed else 4)
    per_pixel = profile.kib_per_latent_pixel[key] * KIB
    scale = counts.activation_width / profile.activation_width * ACTIVATION_ALGORITHM_FACTOR.get(algo, 1.0)
    activations = latent_pixels * per_pixel * scale * ACTIVATION_MARGIN
    caching = config.cache_latents or config.cache_latents_to_disk
    encoded_images = min(config.vae_batch_size, load.largest_batch_images) if caching else load.largest_batch_images
    vae_encode = encoded_images * (load.largest_batch_pixels / load.largest_batch_images) * VAE_ENCODE_BYTES_PER_PIXEL
    text_label = "text encoders" if counts.text_encoder_2 else "text encoder"
    models = {"U-Net": counts.unet * precision.weight_bytes, text_label: counts.text_encoders * precision.weight_bytes,
              "VAE": counts.vae * 4}
    context = {} if device.is_cpu else {"CUDA context": CUDA_CONTEXT_GIB * GIB}
    on_gpu = {name: value for name, value in models.items()
              if not (name == text_label and text_encoders_cached(config))}
    training = {**on_gpu, "adapter": adapter_bytes,
                "activations": activations if caching else max(activations, vae_encode), **context}
    phases = {"training": training}
    if caching:
        phases["caching latents"] = {**models, "adapter": counts.adapter * 4, "VAE encoding": vae_encode, **context}
    elif text_encoders_cached(config):
        phases["caching text-encoder outputs"] = {**models, "adapter": counts.adapter * 4, **context}
    return phases


def vram_breakdown(config: TrainConfig, device: DeviceChoice, load: Workload, counts: ModelCounts,
                   precision: Precision, optimizer_bytes: float) -> dict[str, float]:
    """Bytes per part at the peak: the larger of :func:`vram_phases` (training when they tie)."""
    return _peak(vram_phases(config, device, load, counts, precision, optimizer_bytes))[1]


def _peak(phases: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    return max(phases.items(), key=lambda item: (sum(item[1].values()), item[0] == "training"))


def estimate(config: TrainConfig, device: str | None = None, session_hours: float | None = None,
             family: str | None = None) -> TrainingEstimate:
    """Steps, time per step, VRAM needed vs available and whether the run fits a Colab session, for ``config`` on
    ``device`` (a name from :data:`DEVICES` such as "T4", or None for this runtime's GPU or CPU).

    ``session_hours`` overrides the device's usual Colab session length. ``family`` ("sd1", "sd2" or "sdxl") says
    which architecture to count when the model's files are not on this machine (an SDXL hub id before it is
    downloaded); files that are there say it themselves. All numbers but the steps are estimates: see the module
    docstring and the constants for where each comes from.
    """
    choice = choose_device(device)
    plan, dataset = run_plan(config)
    counts, model_note = model_counts(config, family)
    precision = training_precision(config, choice)
    optimizer_bytes, optimizer_note = optimizer_state_bytes(config, choice)
    load = workload(dataset)
    per_step = seconds_per_step(config, choice, load, plan.steps_per_epoch, counts, precision)
    phases = vram_phases(config, choice, load, counts, precision, optimizer_bytes)
    phase, parts = _peak(phases)
    needed = sum(parts.values()) / GIB
    fits_vram = choice.available_gib is None or needed <= choice.available_gib
    total = per_step * plan.total_steps
    hours = session_hours if session_hours is not None else choice.spec.session_hours
    fits_session = hours is None or total + SETUP_SECONDS <= hours * 3600
    result = TrainingEstimate(plan.total_steps, per_step, total, needed, choice.available_gib, fits_vram,
                              fits_session, choice.label, session_hours=hours, epochs=plan.epochs,
                              steps_per_epoch=plan.steps_per_epoch,
                              vram_breakdown_gib={name: value / GIB for name, value in parts.items()})

    def again(changed: TrainConfig) -> TrainingEstimate:
        return estimate(changed, device, session_hours, family)

    advice = _advice(config, result, phases["training"], load, counts, precision, again)
    notes = [*choice.notes, model_note, precision.note, optimizer_note, _phase_note(config, phase, phases),
             *advice, _speed_note(choice, counts)]
    result.notes = [note for note in notes if note]
    return result


def _phase_note(config: TrainConfig, phase: str, phases: dict[str, dict[str, float]]) -> str | None:
    """Say so when the peak is not training itself, and what training alone needs."""
    if phase == "training":
        return None
    text = f"the peak is while {phase.replace('caching', 'caching the')} with every model on the GPU"
    if phase == "caching latents":
        text += f" (the VAE encoding {config.vae_batch_size} image(s) at once)"
    if text_encoders_cached(config):
        text += "; the text encoders leave it once their outputs are cached"
    return text + f": training itself needs ~{sum(phases['training'].values()) / GIB:.1f} GiB"


def _speed_note(choice: DeviceChoice, counts: ModelCounts | None = None) -> str:
    sdxl = "" if counts is None or counts.family != SDXL else (
        f", x{SDXL_STEP_TIME_AT_1024:g} for an SDXL step at 1024 px")
    return (f"times scale the {choice.spec.name}'s {choice.spec.iterations_per_second:.3g} it/s for SD 1.5 LoRA at "
            f"512 px batch 1 ({choice.spec.quality}; sources in lycolab/estimate.py){sdxl}; real runs vary by ±50%")


def _advice(config: TrainConfig, result: TrainingEstimate, parts: dict[str, float], load: Workload,
            counts: ModelCounts, precision: Precision, again: Callable[[TrainConfig], TrainingEstimate]
            ) -> list[str]:
    notes = []
    if not result.fits_vram and result.vram_available_gib is not None:
        notes.append(_vram_advice(config, result, parts, load, again))
    if not result.fits_session:
        notes.append(f"about {_duration(result.total_seconds + SETUP_SECONDS)} is longer than a session on the "
                     f"{result.device} (~{result.session_hours:g} h): lower max_train_epochs or the repeats, or set "
                     "save_state = true so step 06 resumes after a disconnect")
    if not (config.cache_latents or config.cache_latents_to_disk):
        notes.append("cache_latents = true would skip the VAE at every step (faster)")
    if config.sample_prompts and (config.sample_every_n_epochs or config.sample_every_n_steps):
        notes.append("the sample images made during training add to these times (not counted)")
    return notes


def _vram_advice(config: TrainConfig, result: TrainingEstimate, parts: dict[str, float], load: Workload,
                 again: Callable[[TrainConfig], TrainingEstimate]) -> str:
    """What would fit: the largest batch size, and gradient checkpointing when it is off."""
    fixed = sum(value for name, value in parts.items() if name != "activations") / GIB
    per_image = parts["activations"] / GIB / load.largest_batch_images
    room = (result.vram_available_gib or 0) - fixed
    largest = int(room // per_image) if per_image > 0 else 0
    text = (f"needs ~{result.vram_needed_gib:.1f} GiB but the {result.device} has {result.vram_available_gib:.1f}: "
            f"lower train_batch_size (now {config.train_batch_size}; "
            + (f"~{largest} fits" if largest >= 1 else "even 1 does not fit at this resolution") + ")")
    if not config.gradient_checkpointing:
        checkpointed = again(replace(config, gradient_checkpointing=True))
        verdict = "fits" if checkpointed.fits_vram else "still too much"
        text += f" or turn on gradient_checkpointing ({checkpointed.vram_needed_gib:.1f} GiB: {verdict})"
    return text + ", or lower the resolution"
