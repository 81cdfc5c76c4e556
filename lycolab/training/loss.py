"""The denoising objective: noise (with optional offset), target for epsilon or v-prediction, weighted MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, noise_offset: float | None = None, generator=None) -> torch.Tensor:
    """Gaussian noise; ``noise_offset`` adds a per-channel constant so the model learns very dark/bright images."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device)
        noise = noise + noise_offset * offset.to(latents.dtype)
    return noise


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                    ) -> torch.Tensor:
    """What the U-Net must predict: the noise, or the velocity for v-parameterised (SD 2.x 768-v) models."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE times its weight (prior_loss_weight for regularisation images), averaged over the batch."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * sample_weights.to(per_sample.device)).mean()
