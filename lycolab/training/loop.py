"""The training loop: frozen SD, trainable adapter, accelerate for device/precision, kohya's epochs and saves."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lycolab.config import TrainConfig, network_args_dict
from lycolab.data.dataset import BucketedDataset
from lycolab.models.load import StableDiffusionParts, load_stable_diffusion
from lycolab.models.text import encode_prompts
from lycolab.networks import AdapterNetwork, create_network, load_network
from lycolab.networks.args import network_kwargs
from lycolab.networks.merged_weight import WORKSPACE
from lycolab.training.history import LossHistory
from lycolab.training.latent_cache import LatentCache, encode_latents
from lycolab.training.loss import sample_noise, training_target, weighted_mse
from lycolab.training.metadata import training_metadata
from lycolab.training.optim import build_optimizer
from lycolab.training.sampling import SamplePrompt, generate_samples, read_prompt_file
from lycolab.training.schedule import build_lr_scheduler

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: torch.float16}
# Keys sd-scripts accepts that this version reads but does not act on yet; said once so nobody is misled.
NOT_YET_ACTIVE = ("mem_eff_attn", "save_state", "resume", "sample_every_n_steps",
                  "save_last_n_epochs")


class TrainingError(RuntimeError):
    """Training cannot start or must stop; the message says why and what to change."""


@dataclass
class TrainResult:
    """What a run left on disk, for the CLI, the notebooks and tests."""

    saved_files: list[Path] = field(default_factory=list)
    sample_files: list[Path] = field(default_factory=list)
    loss_plot: Path | None = None
    loss_csv: Path | None = None
    history: LossHistory = field(default_factory=LossHistory)
    total_steps: int = 0
    epochs: int = 0
    seconds: float = 0.0


@dataclass
class RunPlan:
    """Epoch and step counts worked out once, as sd-scripts does (max_train_epochs wins over max_train_steps)."""

    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int


def plan_run(config: TrainConfig, dataset: BucketedDataset) -> RunPlan:
    batches = dataset.batches_per_epoch()
    steps_per_epoch = math.ceil(batches / config.gradient_accumulation_steps)
    if config.max_train_epochs:
        total = config.max_train_epochs * steps_per_epoch
    else:
        total = config.max_train_steps
    return RunPlan(batches, steps_per_epoch, math.ceil(total / steps_per_epoch), total)


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    precision = config.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        logger.warning("mixed_precision fp16 needs a GPU; training in fp32 on this CPU (use bf16 for CPU autocast)")
        precision = "no"
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
                       cpu=not torch.cuda.is_available())


def _warn_inactive(config: TrainConfig) -> None:
    defaults = TrainConfig()
    inactive = [key for key in NOT_YET_ACTIVE if getattr(config, key) != getattr(defaults, key)]
    if inactive:
        logger.warning("not active in this version, ignored: %s", ", ".join(inactive))


def _build_network(config: TrainConfig, parts: StableDiffusionParts, train_text_encoder: bool) -> AdapterNetwork:
    text_encoders = [parts.text_encoder] if train_text_encoder else []
    unet = None if config.network_train_text_encoder_only else parts.unet
    if config.network_weights:
        return load_network(config.network_weights, unet, text_encoders)
    kwargs = network_kwargs(config.network_module, config.network_dim, config.network_alpha,
                            network_args_dict(config), config.network_dropout)
    return create_network(unet, text_encoders, **kwargs)


def _freeze(parts: StableDiffusionParts, device: torch.device, weight_dtype: torch.dtype) -> None:
    for model in (parts.unet, parts.vae, parts.text_encoder):
        model.requires_grad_(False)
        model.eval()
    parts.unet.to(device, dtype=weight_dtype)
    parts.text_encoder.to(device, dtype=weight_dtype)
    parts.vae.to(device, dtype=torch.float32)  # SD's VAE overflows in fp16; it only runs for encoding


def _enable_attention(config: TrainConfig, unet) -> None:
    if not config.xformers:
        return
    try:
        unet.enable_xformers_memory_efficient_attention()
        logger.info("xformers attention enabled")
    except Exception as error:  # xformers missing or no GPU: PyTorch SDPA is the default and nearly as fast
        logger.info("xformers unavailable (%s); using PyTorch scaled-dot-product attention", type(error).__name__)


class Trainer:
    """One training run; ``train()`` is the loop, the rest are its steps, each short enough to read at once."""

    def __init__(self, config: TrainConfig, on_step: Callable[[int, float], None] | None = None,
                 progress: bool = True):
        self.config = config
        self.on_step = on_step
        self.progress = progress
        self.result = TrainResult()

    def setup(self) -> None:
        """Everything that can fail on user input runs first (config, data, prompts), before any model loads."""
        config = self.config
        if not config.pretrained_model_name_or_path:
            raise TrainingError("pretrained_model_name_or_path is not set; run the model download step first")
        if not config.output_dir:
            raise TrainingError("output_dir is not set; set it in config_file.toml")
        _warn_inactive(config)
        self.accelerator = _make_accelerator(config)
        if config.seed is not None:
            from accelerate.utils import set_seed

            set_seed(config.seed)
        self._prepare_data()
        self._prepare_models()
        self._prepare_optimizer()
        caching = config.cache_latents or config.cache_latents_to_disk
        self.latent_cache = (LatentCache(self.dataset, self.parts.vae, config.vae_batch_size,
                                         config.cache_latents_to_disk) if caching else None)
        logger.info("num batches per epoch: %d, num epochs: %d, batch size: %d, gradient accumulation: %d, "
                    "total optimization steps: %d", self.plan.batches_per_epoch, self.plan.epochs,
                    config.train_batch_size, config.gradient_accumulation_steps, self.plan.total_steps)

    def _prepare_data(self) -> None:
        config = self.config
        self.rng = random.Random(config.seed or 0)
        self.dataset = BucketedDataset(config.datasets, config.train_batch_size, seed=config.seed or 0)
        self.dataset.log_summary()
        if len(self.dataset) == 0:
            raise TrainingError("no usable images in the dataset; check image_dir and the skipped-file warnings")
        self.plan = plan_run(config, self.dataset)
        self.sample_prompts = self._read_sample_prompts()
        self.metadata = training_metadata(config, self.dataset)

    def _prepare_models(self) -> None:
        config = self.config
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32)
        device = self.accelerator.device if config.lowram else None
        self.parts = load_stable_diffusion(config.pretrained_model_name_or_path, config.vae,
                                           config.v_parameterization, config.model_config, device, self.weight_dtype)
        _freeze(self.parts, self.accelerator.device, self.weight_dtype)
        _enable_attention(config, self.parts.unet)
        self.train_text_encoder = not config.network_train_unet_only
        self.network = _build_network(config, self.parts, self.train_text_encoder)
        if config.gradient_checkpointing:
            self.parts.unet.enable_gradient_checkpointing()
            self.parts.unet.train()
        self.network.to(self.accelerator.device, dtype=torch.float32)
        self.network.requires_grad_(True)

    def _prepare_optimizer(self) -> None:
        config = self.config
        groups = self.network.parameter_groups(config.unet_lr, config.text_encoder_lr, config.learning_rate)
        optimizer = build_optimizer(config.optimizer_type, groups, config.learning_rate, config.optimizer_args)
        scheduler = build_lr_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps,
                                       self.plan.total_steps * self.accelerator.num_processes,
                                       config.lr_scheduler_num_cycles, config.lr_scheduler_power)
        self.optimizer, self.lr_scheduler = self.accelerator.prepare(optimizer, scheduler)

    def _read_sample_prompts(self) -> list[SamplePrompt]:
        path = self.config.sample_prompts
        if not path:
            return []
        if not Path(path).is_file():
            raise TrainingError(f"{path}: sample_prompts file not found; create it or clear sample_prompts")
        width, height = self.config.datasets[0].resolution
        return read_prompt_file(path, SamplePrompt("", width=width, height=height))

    def batch_latents(self, indices: list[int]) -> torch.Tensor:
        device = self.accelerator.device
        flips = [self.dataset.wants_flip(i, self.rng) for i in indices]
        if self.latent_cache is not None:
            latents = [self.latent_cache.get(i, flip) for i, flip in zip(indices, flips, strict=True)]
            return torch.stack(latents).to(device, torch.float32)
        pixels = [self.dataset.pixels(i, flip, self.rng) for i, flip in zip(indices, flips, strict=True)]
        with torch.no_grad():
            return encode_latents(self.parts.vae, torch.stack(pixels)).float()

    def loss_for_batch(self, indices: list[int], epoch: int) -> torch.Tensor:
        """Noise the latents at random timesteps and score the U-Net's prediction (the DDPM objective)."""
        config, parts = self.config, self.parts
        latents = self.batch_latents(indices)
        captions = [self.dataset.caption(i, self.rng, epoch) for i in indices]
        with torch.set_grad_enabled(self.train_text_encoder), self.accelerator.autocast():
            conditioning = encode_prompts(parts.text_encoder, parts.tokenizer, captions, config.clip_skip,
                                          config.max_token_length, latents.device)
        noise = sample_noise(latents, config.noise_offset)
        timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device)
        noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.accelerator.autocast():
            prediction = parts.unet(noisy.to(self.weight_dtype), timesteps, conditioning.to(self.weight_dtype)).sample
        target = training_target(parts.noise_scheduler, latents, noise, timesteps)
        weights = torch.tensor([config.prior_loss_weight if self.dataset.items[i].record.is_reg else 1.0
                                for i in indices])
        return weighted_mse(prediction, target, weights)

    def optimization_step(self, indices: list[int], epoch: int) -> float:
        with self.accelerator.accumulate(self.network):
            loss = self.loss_for_batch(indices, epoch)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {epoch}; stopped, the last saved epoch is intact. "
                    "Lower the learning rate or use mixed_precision bf16/no"
                )
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.network.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def save(self, epoch: int, step: int, final: bool) -> Path:
        config = self.config
        name = config.output_name or "last"
        path = Path(config.output_dir) / (f"{name}.safetensors" if final else f"{name}-{epoch:06d}.safetensors")
        metadata = {} if config.no_metadata else {
            **self.metadata, "ss_epoch": str(epoch), "ss_steps": str(step), "ss_num_epochs": str(self.plan.epochs),
            "ss_training_finished_at": str(time.time()),
        }
        saved = self.network.save_weights(path, SAVE_DTYPES[config.save_precision], metadata)
        logger.info("saved %s", saved)
        self.result.saved_files.append(saved)
        return saved

    def sample(self, epoch: int) -> None:
        if not self.sample_prompts or not self.accelerator.is_main_process:
            return
        stem = f"{self.config.output_name or 'last'}_e{epoch:06d}"
        self.network.eval()
        paths = generate_samples(self.parts, self.sample_prompts, Path(self.config.output_dir) / "sample", stem,
                                 self.config.sample_sampler, self.config.clip_skip, self.config.max_token_length)
        self.network.train()
        self.result.sample_files += paths

    def _is_due(self, every: int | None, epoch: int) -> bool:
        return bool(every) and epoch % every == 0 and epoch < self.plan.epochs

    def train(self) -> TrainResult:
        """Run every epoch; saves and samples at the configured epochs and at the end."""
        from tqdm.auto import tqdm

        self.setup()
        started = time.time()
        history, step = self.result.history, 0
        bar = tqdm(total=self.plan.total_steps, desc="steps", disable=not self.progress, smoothing=0)
        self.network.train()
        for epoch in range(1, self.plan.epochs + 1):
            for indices in self.dataset.make_batches(epoch):
                loss = self.optimization_step(indices, epoch)
                if not self.accelerator.sync_gradients:
                    continue
                step += 1
                history.add(step, epoch, loss, self.lr_scheduler.get_last_lr()[0])
                bar.update(1)
                bar.set_postfix(epoch=epoch, avr_loss=f"{history.moving_average()[-1]:.4f}")
                if self.on_step:
                    self.on_step(step, loss)
                if step >= self.plan.total_steps:
                    break
            if self._is_due(self.config.save_every_n_epochs, epoch) and self.accelerator.is_main_process:
                self.save(epoch, step, final=False)
            if self._is_due(self.config.sample_every_n_epochs, epoch):
                self.sample(epoch)
            if step >= self.plan.total_steps:
                break
        bar.close()
        self.finish(epoch, step, started)
        WORKSPACE.clear()  # the adapters' reusable full-size buffers; a notebook kernel lives on after training
        return self.result

    def finish(self, epoch: int, step: int, started: float) -> None:
        self.result.seconds = time.time() - started
        self.result.total_steps, self.result.epochs = step, epoch
        if not self.accelerator.is_main_process:
            return
        self.save(epoch, step, final=True)
        self.sample(epoch)
        log_dir = Path(self.config.logging_dir or self.config.output_dir)
        prefix = self.config.log_prefix or ""
        self.result.loss_csv = self.result.history.write_csv(log_dir / f"{prefix}loss.csv")
        self.result.loss_plot = self.result.history.plot(log_dir / f"{prefix}loss.png",
                                                         title=f"{self.config.output_name or 'training'} loss")
        logger.info("training finished: %d steps in %.1f s", step, self.result.seconds)


def train(config: TrainConfig, on_step: Callable[[int, float], None] | None = None, progress: bool = True
          ) -> TrainResult:
    """Train an adapter as configured and return what was written."""
    return Trainer(config, on_step=on_step, progress=progress).train()
