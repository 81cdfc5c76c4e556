"""The denoising objective as sd-scripts computes it: noise, timesteps, noisy latents, target, loss and its weights.

Noise and timesteps are drawn for a whole global batch from generators seeded by its position in the run, so a
resumed run and a run split over several processes draw exactly the numbers an uninterrupted single process does.

sd-scripts' options, from ``library/train_util.py`` (``get_noise_noisy_latents_and_timesteps``,
``get_huber_threshold_if_needed``, ``conditional_loss``), ``library/custom_train_functions.py`` and
``train_network.py`` (``get_noise_scheduler``, ``post_process_loss``), in the order sd-scripts applies them:
noise offset (``adaptive_noise_scale`` adds the latents' channel means to it), then multires noise; timesteps in
[min_timestep, max_timestep); input perturbation noise (``ip_noise_gamma``) in the noisy latents only; the loss
(l2, l1, huber, smooth_l1 with a per-timestep threshold), then per sample: prior weight, min-SNR-γ,
``scale_v_pred_loss_like_noise_pred``, ``v_pred_like_loss``, ``debiased_estimation_loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lycolab.training.seeds import python_rng, torch_generator

if TYPE_CHECKING:
    from lycolab.config import TrainConfig

# A global batch's first stream, keyed (seed, epoch, batch), draws its timesteps, noise and noise offset; the other
# options draw from streams of their own, keyed (seed, epoch, batch, BATCH_SLOT, stream), so that switching one
# option on changes no other draw. BATCH_SLOT is no image's slot: per-image streams use slots 0, 1, ...
BATCH_SLOT = -1
OFFSET_STRENGTH_STREAM = 2
MULTIRES_SCALE_STREAM = 3
MULTIRES_NOISE_STREAM = 4
IP_NOISE_STREAM = 5
IP_STRENGTH_STREAM = 6
SNR_LIMIT = 1000.0  # sd-scripts' cap on the SNR in its loss scales: the SNR at timestep 0 is about 1175


# ------------------------------------------------------------------------------------------------ noise schedule
def prepare_noise_scheduler(noise_scheduler, zero_terminal_snr: bool = False) -> None:
    """Keep each timestep's SNR for the loss weights, then (``zero_terminal_snr``) rescale the betas so the last
    timestep is pure noise (Lin et al. 2023, arXiv:2305.08891).

    As in sd-scripts, the SNR is taken before the rescaling: the weights keep the original schedule's finite SNR
    (the rescaled one is 0 at the last timestep), while noising, v-targets and huber's snr schedule use the new one.
    """
    if not hasattr(noise_scheduler, "all_snr"):
        noise_scheduler.all_snr = _snr(noise_scheduler.alphas_cumprod)
    if zero_terminal_snr:
        betas = zero_terminal_snr_betas(noise_scheduler.betas)
        alphas = 1.0 - betas
        noise_scheduler.betas, noise_scheduler.alphas = betas, alphas
        noise_scheduler.alphas_cumprod = torch.cumprod(alphas, dim=0)


def _snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """(α/σ)² with α = √ᾱ and σ = √(1-ᾱ), computed in that order as sd-scripts does."""
    return (torch.sqrt(alphas_cumprod) / torch.sqrt(1.0 - alphas_cumprod)) ** 2


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose √ᾱ is shifted to reach 0 at the last timestep and scaled to keep its first value."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    cumulative = root**2
    alphas = torch.cat([cumulative[:1], cumulative[1:] / cumulative[:-1]])
    return 1.0 - alphas


def timestep_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The SNR of each timestep: the one kept by :func:`prepare_noise_scheduler`, else the scheduler's own."""
    snr = getattr(noise_scheduler, "all_snr", None)
    if snr is None:
        snr = _snr(noise_scheduler.alphas_cumprod)
    return snr.to(timesteps.device)[timesteps]


# ------------------------------------------------------------------------------------------------------- noise
@dataclass
class BatchNoise:
    """Every random number one global batch needs, on the CPU; :meth:`noise` assembles them as sd-scripts does."""

    timesteps: torch.Tensor
    base: torch.Tensor  # standard normal, the shape of the latents
    offset_direction: torch.Tensor | None = None  # standard normal, one per sample and channel
    offset_strength: float | torch.Tensor | None = None  # noise_offset, or a random fraction of it
    adaptive_noise_scale: float | None = None
    pyramid: list[torch.Tensor] = field(default_factory=list)  # multires components, upsampled and discounted
    perturbation: torch.Tensor | None = None  # ip_noise_gamma's noise, strength applied

    @property
    def needs_latent_means(self) -> bool:
        return self.offset_direction is not None and self.adaptive_noise_scale is not None

    def noise(self, latent_means: torch.Tensor | None = None) -> torch.Tensor:
        """The whole batch's noise; ``latent_means`` (B, C, 1, 1) are the latents' channel means, which
        ``adaptive_noise_scale`` needs. Multires noise is normalised by the standard deviation of the whole batch."""
        noise = self.base
        if self.offset_direction is not None:
            strength = self.offset_strength
            if self.adaptive_noise_scale is not None:
                strength = torch.clamp(strength + self.adaptive_noise_scale * torch.abs(latent_means), min=0.0)
            noise = noise + strength * self.offset_direction
        if self.pyramid:
            for component in self.pyramid:
                noise = noise + component
            noise = noise / noise.std()
        return noise


def draw_batch_noise(config: TrainConfig, shape: tuple[int, ...], num_timesteps: int, seed: int, epoch: int,
                     batch_index: int) -> BatchNoise:
    """Timesteps and noise for a global batch of latents of ``shape``, from the streams of its position."""
    generator = torch_generator(seed, epoch, batch_index)
    low = config.min_timestep if config.min_timestep is not None else 0
    high = config.max_timestep if config.max_timestep is not None else num_timesteps
    if low < high:
        timesteps = torch.randint(low, high, (shape[0],), generator=generator)
    else:  # sd-scripts: one fixed timestep
        timesteps = torch.full((shape[0],), high, dtype=torch.long)
    draws = BatchNoise(timesteps, torch.randn(shape, generator=generator))
    key = (seed, epoch, batch_index, BATCH_SLOT)
    if config.noise_offset:
        draws.offset_direction = torch.randn((shape[0], shape[1], 1, 1), generator=generator)
        draws.offset_strength = config.noise_offset
        if config.noise_offset_random_strength:
            strength_generator = torch_generator(*key, OFFSET_STRENGTH_STREAM)
            draws.offset_strength = torch.rand(1, generator=strength_generator) * config.noise_offset
        draws.adaptive_noise_scale = config.adaptive_noise_scale
    if config.multires_noise_iterations:
        draws.pyramid = pyramid_components(shape, config.multires_noise_iterations, config.multires_noise_discount,
                                           python_rng(*key, MULTIRES_SCALE_STREAM),
                                           torch_generator(*key, MULTIRES_NOISE_STREAM))
    if config.ip_noise_gamma:
        strength = config.ip_noise_gamma
        if config.ip_noise_gamma_random_strength:
            strength = torch.rand(1, generator=torch_generator(*key, IP_STRENGTH_STREAM)) * config.ip_noise_gamma
        draws.perturbation = strength * torch.randn(shape, generator=torch_generator(*key, IP_NOISE_STREAM))
    return draws


def pyramid_components(shape: tuple[int, ...], iterations: int, discount: float, scales, generator: torch.Generator
                       ) -> list[torch.Tensor]:
    """Multires (pyramid) noise: level i is noise at 1/rⁱ of the size (r uniform in [2, 4) per level), resized
    bilinearly to full size and weighted discountⁱ; it stops after the first level that is 1 pixel high or wide."""
    batch, channels, height, width = shape
    components = []
    for level in range(iterations):
        ratio = scales.random() * 2 + 2
        small_height = max(1, int(height / (ratio**level)))
        small_width = max(1, int(width / (ratio**level)))
        small = torch.randn((batch, channels, small_height, small_width), generator=generator)
        components.append(F.interpolate(small, size=(height, width), mode="bilinear") * discount**level)
        if small_height == 1 or small_width == 1:
            break
    return components


def noisy_latents(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  perturbation: torch.Tensor | None = None) -> torch.Tensor:
    """The U-Net's input; input perturbation noise (Ning et al. 2023) goes into it but not into the target."""
    if perturbation is not None:
        noise = noise + perturbation
    return noise_scheduler.add_noise(latents, noise, timesteps)


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                    ) -> torch.Tensor:
    """What the U-Net must predict: the noise, or the velocity for v-parameterised (SD 2.x 768-v) models."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


# -------------------------------------------------------------------------------------------------------- loss
def huber_threshold(config: TrainConfig, noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor | None:
    """huber/smooth_l1's threshold per sample. exponential: huber_scale·exp(ln(huber_c)·t/T), from huber_scale at
    t=0 to huber_c·huber_scale at T; snr: (1-huber_c)/(1+σ_t)² + huber_c with σ_t = √((1-ᾱ)/ᾱ), 1 at t=0 falling to
    huber_c (huber_scale is not used, as in sd-scripts); constant: huber_c·huber_scale."""
    if config.loss_type not in ("huber", "smooth_l1"):
        return None
    if config.huber_schedule == "exponential":
        alpha = -math.log(config.huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps) * config.huber_scale
    if config.huber_schedule == "snr":
        alphas_cumprod = noise_scheduler.alphas_cumprod.cpu()[timesteps.cpu()]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return ((1 - config.huber_c) / (1 + sigmas) ** 2 + config.huber_c).to(timesteps.device)
    return torch.full((timesteps.shape[0],), config.huber_c * config.huber_scale, device=timesteps.device)


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean loss, in fp32 whatever the autocast dtype. huber: 2c(√(d²+c²) - c), about d² for small
    errors and 2c|d| for large ones; smooth_l1: 2(√(d²+c²) - c), the same divided by c."""
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        loss = F.mse_loss(prediction, target, reduction="none")
    elif loss_type == "l1":
        loss = F.l1_loss(prediction, target, reduction="none")
    else:
        c = huber_c.view(-1, *([1] * (prediction.ndim - 1)))
        excess = torch.sqrt((prediction - target) ** 2 + c**2) - c
        loss = 2 * c * excess if loss_type == "huber" else 2 * excess
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, as sd-scripts applies them): min(SNR, γ)/SNR for epsilon
    prediction, min(SNR, γ)/(SNR+1) for v-prediction; easy low-noise timesteps stop dominating the gradient."""
    snr = timestep_snr(noise_scheduler, timesteps).float()
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def _capped_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    snr = timestep_snr(noise_scheduler, timesteps)
    return torch.minimum(snr, torch.ones_like(snr) * SNR_LIMIT)


def weighted_loss(loss: torch.Tensor, timesteps: torch.Tensor, noise_scheduler, config: TrainConfig
                  ) -> torch.Tensor:
    """sd-scripts' per-timestep loss weights, in its order (``post_process_loss``).

    min_snr_gamma: × min(SNR, γ)/SNR (epsilon) or /(SNR+1) (v); scale_v_pred_loss_like_noise_pred: × SNR/(SNR+1);
    v_pred_like_loss = k: + k·loss/(SNR/(SNR+1)); debiased_estimation_loss: × 1/√SNR (epsilon) or 1/(SNR+1) (v).
    The last three cap the SNR at 1000.
    """
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    if config.min_snr_gamma:
        loss = loss * min_snr_weights(noise_scheduler, timesteps, config.min_snr_gamma).to(loss.device)
    if config.scale_v_pred_loss_like_noise_pred:
        snr = _capped_snr(noise_scheduler, timesteps)
        loss = loss * (snr / (snr + 1))
    if config.v_pred_like_loss:
        snr = _capped_snr(noise_scheduler, timesteps)
        loss = loss + loss / (snr / (snr + 1)) * config.v_pred_like_loss
    if config.debiased_estimation_loss:
        snr = _capped_snr(noise_scheduler, timesteps)
        loss = (1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)) * loss
    return loss
