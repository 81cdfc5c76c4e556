"""The denoising objective: noise (with optional offset), target for epsilon or v-prediction, per-sample MSE, min-SNR.

Noise and timesteps are drawn for a whole global batch from a generator seeded by its position in the run, so a
resumed run and a run split over several processes draw exactly the numbers an uninterrupted single process does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_noise(shape: tuple[int, ...], num_timesteps: int, generator: torch.Generator,
                noise_offset: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) on the CPU for ``shape[0]`` samples; ``noise_offset`` adds a per-channel constant so the
    model can learn very dark or bright images."""
    timesteps = torch.randint(0, num_timesteps, (shape[0],), generator=generator)
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise, timesteps


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                    ) -> torch.Tensor:
    """What the U-Net must predict: the noise, or the velocity for v-parameterised (SD 2.x 768-v) models."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in fp32 whatever the autocast dtype."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, as sd-scripts applies them): min(SNR, γ)/SNR for epsilon
    prediction, min(SNR, γ)/(SNR+1) for v-prediction; easy low-noise timesteps stop dominating the gradient."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr
