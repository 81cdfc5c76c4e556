"""The training loop: frozen SD, trainable adapter, accelerate for device/precision, kohya's epochs and saves.

Randomness comes from streams keyed by the run's seed and the position in the run (``training.seeds``), and the
state saved with ``save_state`` holds everything else that changes (adapter, optimizer, scheduler, torch RNG for
dropout, loss history). So a run killed at any point and resumed from its last state ends with exactly the weights
of an uninterrupted run, and N processes sharing each global batch compute what one process would.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lycolab.config import TrainConfig, network_args_dict
from lycolab.data.dataset import BucketedDataset
from lycolab.files import WriteError, as_write_error
from lycolab.models.load import StableDiffusionParts, load_stable_diffusion
from lycolab.models.text import Conditioning, encode_conditioning, sdxl_time_ids
from lycolab.networks import AdapterNetwork, create_network, load_network
from lycolab.networks.args import network_kwargs
from lycolab.networks.io import save_adapter_file
from lycolab.networks.max_norm import MaxNormResult, apply_max_norm
from lycolab.networks.merged_weight import WORKSPACE
from lycolab.training import checkpoints, distributed
from lycolab.training.batch_loader import (
    BatchInputs,
    PlannedBatch,
    RunBatches,
    iterate_batches,
    plan_batches,
    worker_count,
)
from lycolab.training.callbacks import TrainingCallback
from lycolab.training.history import LossHistory
from lycolab.training.latent_cache import LatentCache, encode_latents
from lycolab.training.logs import TrainingLog
from lycolab.training.loss import (
    BatchNoise,
    draw_batch_noise,
    huber_threshold,
    noisy_latents,
    per_sample_loss,
    prepare_noise_scheduler,
    training_target,
    weighted_loss,
)
from lycolab.training.metadata import SDXL_MODEL_VERSION, optimizer_metadata, save_metadata, training_metadata
from lycolab.training.optim import build_optimizer
from lycolab.training.sampling import SamplePrompt, generate_samples, make_grid, read_prompt_file
from lycolab.training.schedule import lr_scheduler_for
from lycolab.training.seeds import torch_generator
from lycolab.training.state import StateError, TrainingState, load_state, pack, resume_folder, save_state, unpack
from lycolab.training.state import state_dir_name as state_name
from lycolab.training.text_cache import TextEncoderCache, text_encoders_on

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: torch.float16}
VAE_STREAM = 1  # tells the per-image VAE sampling stream apart from the batch's noise stream
OUT_OF_MEMORY_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")
# Failures of a write wherever it happens (an adapter, a state, a sample, the loss log): the disk, not the code.
DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


class TrainingError(RuntimeError):
    """Training cannot start or must stop; the message says why and what to change."""


@dataclass
class TrainResult:
    """What a run left on disk, for the CLI, the notebooks and tests."""

    saved_files: list[Path] = field(default_factory=list)
    state_dirs: list[Path] = field(default_factory=list)
    sample_files: list[Path] = field(default_factory=list)
    grid_files: list[Path] = field(default_factory=list)
    loss_plot: Path | None = None
    loss_csv: Path | None = None
    loss_jsonl: Path | None = None
    tensorboard_dir: Path | None = None
    history: LossHistory = field(default_factory=LossHistory)
    total_steps: int = 0
    epochs: int = 0
    seconds: float = 0.0
    resumed_from: Path | None = None


@dataclass
class RunPlan:
    """Epoch and step counts worked out once, as sd-scripts does (max_train_epochs wins over max_train_steps)."""

    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int


def plan_run(config: TrainConfig, dataset: BucketedDataset, processes: int = 1) -> RunPlan:
    batches = dataset.batches_per_epoch(processes)
    steps_per_epoch = math.ceil(batches / config.gradient_accumulation_steps)
    if config.max_train_epochs:
        total = config.max_train_epochs * steps_per_epoch
    else:
        total = config.max_train_steps
    return RunPlan(batches, steps_per_epoch, math.ceil(total / steps_per_epoch), total)


def _make_accelerator(config: TrainConfig):
    """accelerate keeps one global state per process; a notebook that trains again with another mixed_precision
    would get "restart your runtime", so a single-process run starts from a fresh state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = config.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        logger.warning("mixed_precision fp16 needs a GPU; training in fp32 on this CPU (use bf16 for CPU autocast)")
        precision = "no"
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def _merge_base_weights(config: TrainConfig, parts: StableDiffusionParts) -> None:
    """sd-scripts' ``base_weights``: adapters baked into the frozen model at their multipliers (default 1) before
    the trained network wraps it, so training learns a difference on top of them."""
    from lycolab.networks.merge import merge_files

    multipliers = [float(value) for value in config.base_weights_multiplier or []]
    pairs = [(path, multipliers[index] if index < len(multipliers) else 1.0)
             for index, path in enumerate(config.base_weights or [])]
    merge_files(parts.unet, parts.text_encoders, pairs)
    logger.info("all weights merged: %s", ", ".join(Path(path).name for path, _ in pairs))


def _build_network(config: TrainConfig, parts: StableDiffusionParts, train_text_encoder: bool) -> AdapterNetwork:
    """The network the arguments describe, as sd-scripts builds it: ``network_weights`` are loaded into it (its
    dims and dropouts kept; a shape that differs is an error), and with ``dim_from_weights`` the network is built
    from the file instead."""
    text_encoders = parts.text_encoders if train_text_encoder else []
    unet = None if config.network_train_text_encoder_only else parts.unet
    if config.base_weights:
        _merge_base_weights(config, parts)
    if config.dim_from_weights:
        return load_network(config.network_weights, unet, text_encoders)
    kwargs = network_kwargs(config.network_module, config.network_dim, config.network_alpha,
                            network_args_dict(config), config.network_dropout)
    network = create_network(unet, text_encoders, **kwargs)
    if config.network_weights:
        _load_weights_into(network, config.network_weights, unet)
    return network


def _load_weights_into(network: AdapterNetwork, path: str, unet=None) -> None:
    from lycolab.networks.io import read_adapter_file

    tensors, _ = read_adapter_file(path)
    tensors = _in_network_names(network, tensors, unet)
    own = network.state_dict()
    different = [key for key, value in tensors.items() if key in own and own[key].shape != value.shape]
    if different:
        key = different[0]
        raise TrainingError(f"network_weights {Path(path).name}: {key} has shape {tuple(tensors[key].shape)}, this "
                            f"network's is {tuple(own[key].shape)}; use the network_dim / conv_dim it was trained "
                            "with, or dim_from_weights = true")
    usable = {key: value.to(own[key].dtype) for key, value in tensors.items() if key in own}
    network.load_state_dict(usable, strict=False)
    missing, unexpected = len(own) - len(usable), len(tensors) - len(usable)
    logger.info("loaded network_weights %s: %d tensors%s%s", Path(path).name, len(usable),
                f", {missing} of this network's not in the file (kept as initialised)" if missing else "",
                f", {unexpected} in the file not in this network (left out)" if unexpected else "")


def _in_network_names(network: AdapterNetwork, tensors: dict[str, torch.Tensor], unet) -> dict[str, torch.Tensor]:
    """A file's keys under this network's names: an SDXL file LyCORIS wrote for a diffusers U-Net names the same
    layers in the diffusers layout (``lora_unet_down_blocks_1_…``), which this network calls by sd-scripts' names."""
    from lycolab.networks.io import adaptable_layers

    if unet is None:
        return tensors
    layers = adaptable_layers(unet, [])
    names = {id(adapter.org_module): adapter.lora_name for adapter in network.unet_adapters}
    renamed = {}
    for key, value in tensors.items():
        module_name, _, rest = key.partition(".")
        own_name = names.get(id(layers[module_name])) if module_name in layers else None
        renamed[f"{own_name}.{rest}" if own_name else key] = value
    return renamed


def _freeze(parts: StableDiffusionParts, device: torch.device, weight_dtype: torch.dtype) -> None:
    for model in parts.models:
        model.requires_grad_(False)
        model.eval()
    for model in [parts.unet, *parts.text_encoders]:
        model.to(device, dtype=weight_dtype)
    parts.vae.to(device, dtype=torch.float32)  # SD's VAE overflows in fp16; it only runs for encoding


def _enable_attention(config: TrainConfig, unet) -> None:
    """xformers when asked and present; otherwise PyTorch SDPA, whose memory-efficient kernel is what
    ``mem_eff_attn`` asks for (diffusers' default processor on torch 2)."""
    if config.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
            logger.info("xformers attention enabled")
            return
        except Exception as error:  # xformers missing or no GPU: SDPA is nearly as fast
            logger.info("xformers unavailable (%s); using PyTorch scaled-dot-product attention", type(error).__name__)
    if config.xformers or config.mem_eff_attn or config.sdpa:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def _out_of_memory_message(config: TrainConfig, error: BaseException) -> str | None:
    if not isinstance(error, (torch.OutOfMemoryError, MemoryError)) and not any(
            marker in str(error).lower() for marker in OUT_OF_MEMORY_MARKERS):
        return None
    width, height = config.datasets[0].resolution if config.datasets else (0, 0)
    lower = [f"train_batch_size (now {config.train_batch_size})", f"resolution (now {width}x{height})"]
    if not config.gradient_checkpointing:
        lower.append("or set gradient_checkpointing = true")
    if config.mixed_precision == "no" and torch.cuda.is_available():
        lower.append('mixed_precision = "fp16"')
    if not (config.xformers or config.sdpa or config.mem_eff_attn):
        lower.append("sdpa = true")
    return "out of memory: lower " + ", ".join(lower)


class Trainer:
    """One training run; ``train()`` is the loop, the rest are its steps, each short enough to read at once."""

    def __init__(self, config: TrainConfig, on_step: Callable[[int, float], None] | None = None,
                 progress: bool = True, callbacks: Iterable[TrainingCallback] = ()):
        self.config = config
        self.on_step = on_step
        self.progress = progress
        self.callbacks = list(callbacks)
        self.result = TrainResult()
        self.name = config.output_name or "last"
        self.log: TrainingLog | None = None
        self.position = (0, 1, 0)  # (step, epoch, next batch of that epoch)
        self.max_norm: MaxNormResult | None = None  # the last step's scale_weight_norms report

    # ------------------------------------------------------------------------------------------------ setting up
    def setup(self) -> None:
        """Everything that can fail on user input runs first (config, state, data, prompts), before models load."""
        config = self.config
        if not config.pretrained_model_name_or_path:
            raise TrainingError("pretrained_model_name_or_path is not set; run the model download step first")
        if not config.output_dir:
            raise TrainingError("output_dir is not set; set it in config_file.toml")
        self.accelerator = _make_accelerator(config)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        resume = self._read_resume_state()
        self.seed = distributed.broadcast_int(self._run_seed(resume))
        from accelerate.utils import set_seed

        set_seed(self.seed)
        self._prepare_data()
        self._prepare_models()
        self._prepare_optimizer()
        if resume is not None:
            self._restore(resume)
        distributed.broadcast_module(self.network)
        self._prepare_latent_cache()
        self.log = self._open_log() if self.is_main else None
        logger.info("num batches per epoch: %d, num epochs: %d, batch size: %d x %d processes, gradient "
                    "accumulation: %d, total optimization steps: %d, seed: %d", self.plan.batches_per_epoch,
                    self.plan.epochs, config.train_batch_size, self.world, config.gradient_accumulation_steps,
                    self.plan.total_steps, self.seed)

    def _run_seed(self, resume: TrainingState | None) -> int:
        if resume is not None:
            return resume.seed
        if self.config.seed is not None:
            return self.config.seed
        return int.from_bytes(os.urandom(4), "little")  # recorded in the state and the metadata

    def _read_resume_state(self) -> TrainingState | None:
        resume = self.config.resume
        if not resume:
            return None
        try:
            folder = resume_folder(resume, self.config.output_dir, self.name)  # a damaged newest one is refused
            if folder is None:
                logger.info("resume = latest: no %s-*state folder in %s yet, starting from the beginning",
                            self.name, self.config.output_dir)
                return None
            state = load_state(folder)
        except StateError as error:
            raise TrainingError(str(error)) from None
        self.result.resumed_from = folder
        logger.info("resuming from %s (step %d, epoch %d)", folder, state.step, state.epoch)
        return state

    def _prepare_data(self) -> None:
        config = self.config
        self.dataset = BucketedDataset(config.datasets, config.train_batch_size, seed=self.seed)
        self.dataset.log_summary()
        if len(self.dataset) == 0:
            raise TrainingError("no usable images in the dataset; check image_dir and the skipped-file warnings")
        self.plan = plan_run(config, self.dataset, self.world)
        if config.save_n_epoch_ratio:  # sd-scripts: about that many epoch saves over the run
            config.save_every_n_epochs = math.floor(self.plan.epochs / config.save_n_epoch_ratio) or 1
        self.sample_prompts = self._read_sample_prompts()
        self.metadata = training_metadata(config, self.dataset, self.plan, self.world)
        self.metadata["ss_seed"] = str(self.seed)

    def _prepare_models(self) -> None:
        config = self.config
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32)
        device = self.accelerator.device if config.lowram else None
        self.parts = load_stable_diffusion(config.pretrained_model_name_or_path, config.vae,
                                           config.v_parameterization, config.model_config, device, self.weight_dtype)
        prepare_noise_scheduler(self.parts.noise_scheduler, config.zero_terminal_snr)
        self._check_family()
        _freeze(self.parts, self.accelerator.device, self.weight_dtype)
        _enable_attention(config, self.parts.unet)
        self.train_text_encoder = not config.network_train_unet_only
        self.network = _build_network(config, self.parts, self.train_text_encoder)
        if config.gradient_checkpointing:
            self.parts.unet.enable_gradient_checkpointing()
            self.parts.unet.train()
        self.network.to(self.accelerator.device, dtype=self._network_dtype())
        self.network.requires_grad_(True)
        self.parameters = [p for p in self.network.parameters() if p.requires_grad]

    def _network_dtype(self) -> torch.dtype:
        """float32, or with sd-scripts' ``full_fp16`` / ``full_bf16`` the training dtype (the adapter, its gradients
        and optimizer state then take half the memory). fp16 gradients need the scaler to unscale them, which
        sd-scripts allows by patching accelerate's scaler the same way."""
        config = self.config
        if not (config.full_fp16 or config.full_bf16):
            return torch.float32
        if self.weight_dtype == torch.float32:  # fp16 on a CPU trains in fp32 (_make_accelerator warned)
            logger.warning("%s has no effect without a GPU for its mixed precision; the adapter stays float32",
                           "full_fp16" if config.full_fp16 else "full_bf16")
            return torch.float32
        scaler = self.accelerator.scaler
        if scaler is not None:
            unscale = scaler._unscale_grads_
            scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: unscale(
                optimizer, inv_scale, found_inf, True)
        return self.weight_dtype

    def _check_family(self) -> None:
        """SDXL rules sd-scripts' sdxl_train_network.py applies: no v2; clip_skip has no effect (it warns)."""
        if not self.parts.is_sdxl:
            return
        if self.config.v2:
            raise TrainingError("v2 = true, but this is an SDXL model; set v2 = false (SDXL is neither SD 1.x nor 2.x)")
        if self.config.clip_skip is not None:
            logger.warning("clip_skip = %s has no effect on SDXL, which always uses the penultimate layers (as in "
                           "sd-scripts)", self.config.clip_skip)
        self.metadata["ss_base_model_version"] = SDXL_MODEL_VERSION

    def _prepare_optimizer(self) -> None:
        config = self.config
        groups = self.network.parameter_groups(config.unet_lr, config.text_encoder_lr, config.learning_rate)
        self.group_names = [group["name"] for group in groups]
        choice = build_optimizer(config.optimizer_type, groups, config.learning_rate, config.optimizer_args)
        self.optimizer_name = choice.name
        self.metadata.update(optimizer_metadata(config, choice))
        self.lr_scheduler = lr_scheduler_for(config, choice, self.plan.total_steps)
        self.optimizer = self.accelerator.prepare(choice.optimizer)
        self.schedule_free = choice.optimizer if choice.schedule_free else None

    def _prepare_latent_cache(self) -> None:
        config = self.config
        self.latent_cache = None
        if config.cache_latents or config.cache_latents_to_disk:
            with self.accelerator.main_process_first():  # one process writes disk caches, the others read them
                self.latent_cache = LatentCache(self.dataset, self.parts.vae, config.vae_batch_size,
                                                config.cache_latents_to_disk, self.seed)
        self.text_cache = None
        if config.cache_text_encoder_outputs:
            with self.accelerator.main_process_first(), self.accelerator.autocast():
                self.text_cache = TextEncoderCache(self.dataset, self.parts, config.clip_skip,
                                                   config.max_token_length, config.vae_batch_size,
                                                   config.cache_text_encoder_outputs_to_disk, self.accelerator.device)
            for encoder in self.parts.text_encoders:  # only sampling needs them now, and it brings them back
                encoder.to("cpu")

    def _open_log(self) -> TrainingLog:
        config = self.config
        log = TrainingLog(config.logging_dir or config.output_dir, config.log_prefix or "", self.group_names,
                          self.result.history, tensorboard=bool(config.logging_dir))
        self.result.loss_csv, self.result.loss_jsonl = log.csv_path, log.jsonl_path
        self.result.tensorboard_dir = log.tensorboard_dir
        return log

    def _read_sample_prompts(self) -> list[SamplePrompt]:
        path = self.config.sample_prompts
        if not path:
            return []
        if not Path(path).is_file():
            raise TrainingError(f"{path}: sample_prompts file not found; create it or clear sample_prompts")
        width, height = self.config.datasets[0].resolution
        return read_prompt_file(path, SamplePrompt("", width=width, height=height))

    # --------------------------------------------------------------------------------------------------- state
    def capture_state(self) -> TrainingState:
        step, epoch, next_batch = self.position
        tensors = {f"network/{key}": value.detach().float().cpu().contiguous()
                   for key, value in self.network.state_dict().items()}
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for index, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{index}"] = rng
        info = {
            "optimizer_name": self.optimizer_name,
            "optimizer": pack(self.optimizer.state_dict(), "optimizer", tensors),
            "scheduler": pack(self.lr_scheduler.state_dict(), "scheduler", tensors),
            "scaler": pack(self.accelerator.scaler.state_dict(), "scaler", tensors)
            if self.accelerator.scaler is not None else None,
            "history": self.result.history.to_dict(),
            "total_steps": self.plan.total_steps,
        }
        return TrainingState(step, epoch, next_batch, self.seed, info, tensors)

    def _restore(self, state: TrainingState) -> None:
        if state.info.get("optimizer_name") != self.optimizer_name:
            raise TrainingError(f"the state was saved with optimizer {state.info.get('optimizer_name')}, this run "
                                f"uses {self.optimizer_name}; use the same optimizer_type to resume")
        try:
            self.network.load_state_dict(state.group("network"))
            self.optimizer.load_state_dict(unpack(state.info["optimizer"], state.tensors))
            self.lr_scheduler.load_state_dict(unpack(state.info["scheduler"], state.tensors))
            if state.info.get("scaler") and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(unpack(state.info["scaler"], state.tensors))
            torch.set_rng_state(state.tensors["rng/torch"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            detail = " ".join(str(error).split())[:200]  # load_state_dict's report spans many lines
            raise TrainingError(f"{self.result.resumed_from}: the state does not fit this network ({detail}); "
                                "use the same network settings as the run that saved it") from None
        cuda_states = [state.tensors[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count())
                       if f"rng/cuda/{i}" in state.tensors]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
        self.result.history = LossHistory.from_dict(state.info.get("history", {}))
        self.position = (state.step, state.epoch, state.next_batch)

    # ----------------------------------------------------------------------------------------------- one step
    def batch_reader(self, planned: list[PlannedBatch], rank: int | None = None) -> RunBatches:
        """The planned batches as this process (or ``rank``) reads them: images only when no latent cache holds
        them."""
        return RunBatches(self.dataset, planned, self.seed, self.plan.total_steps, self.latent_cache is None,
                          self.rank if rank is None else rank, self.world)

    def batch_latents(self, inputs: BatchInputs) -> torch.Tensor:
        """Latents of this share of the batch, flipped where ``flip_aug`` said, from the cache or the VAE."""
        device = self.accelerator.device
        if self.latent_cache is not None:
            latents = [self.latent_cache.get(i, flip) for i, flip in zip(inputs.indices, inputs.flips, strict=True)]
            return torch.stack(latents).to(device, torch.float32)
        planned = inputs.planned
        generators = [torch_generator(self.seed, planned.epoch, planned.batch_index, slot, VAE_STREAM)
                      for slot in inputs.positions]
        with torch.no_grad():
            return encode_latents(self.parts.vae, inputs.pixels.to(device), generators).float()

    def conditioning(self, inputs: BatchInputs) -> Conditioning:
        """The batch's text conditioning: from the text-encoder cache, or encoded now (with gradients when a
        text-encoder adapter trains)."""
        if self.text_cache is not None:
            return self.text_cache.batch(inputs.indices, self.accelerator.device)
        with torch.set_grad_enabled(self.train_text_encoder), self.accelerator.autocast():
            return encode_conditioning(self.parts, inputs.captions, self.config.clip_skip,
                                       self.config.max_token_length, self.accelerator.device)

    def added_conditioning(self, inputs: BatchInputs, conditioning: Conditioning) -> dict | None:
        """SDXL's added conditioning: the pooled text embedding and each image's size/crop numbers."""
        if conditioning.pooled is None:
            return None
        sizes = [self.dataset.size_conditioning(index, flip) for index, flip in zip(inputs.indices, inputs.flips,
                                                                                       strict=True)]
        time_ids = sdxl_time_ids(*zip(*sizes, strict=True))
        return {"text_embeds": conditioning.pooled.to(self.weight_dtype),
                "time_ids": time_ids.to(self.accelerator.device, self.weight_dtype)}

    def loss_sum(self, inputs: BatchInputs, draws: BatchNoise) -> torch.Tensor:
        """Sum of this process's per-sample losses (weighted) for its share of one global batch."""
        config, parts, device = self.config, self.parts, self.accelerator.device
        indices, positions = inputs.indices, inputs.positions
        latents = self.batch_latents(inputs)
        conditioning = self.conditioning(inputs)
        added = self.added_conditioning(inputs, conditioning)
        share = slice(positions.start, positions.stop)
        means = self.latent_means(latents, positions, len(draws.timesteps)) if draws.needs_latent_means else None
        noise, timesteps = draws.noise(means)[share].to(device), draws.timesteps[share].to(device)
        perturbation = draws.perturbation[share].to(device) if draws.perturbation is not None else None
        noisy = noisy_latents(parts.noise_scheduler, latents, noise, timesteps, perturbation)
        with self.accelerator.autocast():
            prediction = parts.unet(noisy.to(self.weight_dtype), timesteps, conditioning.states.to(self.weight_dtype),
                                    added_cond_kwargs=added).sample
        target = training_target(parts.noise_scheduler, latents, noise, timesteps)
        per_sample = per_sample_loss(prediction, target, config.loss_type,
                                     huber_threshold(config, parts.noise_scheduler, timesteps))
        weights = torch.tensor([config.prior_loss_weight if self.dataset.items[i].record.is_reg else 1.0
                                for i in indices], device=device)
        return weighted_loss(per_sample * weights, timesteps, parts.noise_scheduler, config).sum()

    def latent_means(self, latents: torch.Tensor | None, positions: range, batch_size: int) -> torch.Tensor:
        """The channel means of the global batch's latents, for adaptive_noise_scale. Multires noise is normalised
        over the whole batch, so with several processes each fills in its share and a sum gathers them (x + 0 is
        exact); a process with an empty share adds zeros."""
        channels = self.parts.unet.config.in_channels
        means = torch.zeros((batch_size, channels, 1, 1), device=self.accelerator.device)
        if latents is not None:
            means[positions.start:positions.stop] = latents.mean(dim=(2, 3), keepdim=True)
        if self.config.multires_noise_iterations and distributed.is_distributed():
            torch.distributed.all_reduce(means)
        return means.cpu()

    def micro_step(self, inputs: BatchInputs) -> torch.Tensor:
        """Forward and backward for this process's share of one global batch; returns its loss share."""
        planned = inputs.planned
        width, height = self.dataset.items[planned.items[0]].bucket.bucket_resolution
        channels = self.parts.unet.config.in_channels
        draws = draw_batch_noise(self.config, (len(planned.items), channels, height // 8, width // 8),
                                 self.parts.noise_scheduler.config.num_train_timesteps, self.seed, planned.epoch,
                                 planned.batch_index)
        if not inputs.indices:
            if draws.needs_latent_means:
                self.latent_means(None, inputs.positions, len(planned.items))  # the others wait for its zeros
            return torch.zeros((), device=self.accelerator.device)
        loss = self.loss_sum(inputs, draws) / len(planned.items)
        self.accelerator.backward(loss / self.config.gradient_accumulation_steps)
        return loss.detach()

    def apply_gradients(self, loss: torch.Tensor, step: int, epoch: int) -> float:
        """Sum gradients over processes, stop on a non-finite loss, clip, step the optimizer and the schedule."""
        loss_value = distributed.sum_gradients_and_loss(self.parameters, loss).item()
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"loss became {loss_value} at epoch {epoch}, step {step}; stopped, the last save is intact. "
                "Lower the learning rate or use mixed_precision bf16/no"
            )
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.scale_weight_norms:  # after the step, as sd-scripts (every process: the result is the same)
            self.max_norm = apply_max_norm(self.network, self.config.scale_weight_norms)
        return loss_value

    def run_epoch(self, epoch: int, start_batch: int, bar, batches: Iterator[BatchInputs]) -> bool:
        """Train from ``start_batch`` to the end of the epoch, taking its batches' inputs in order from
        ``batches``; True when the run's last step was reached."""
        step, accumulate = self.position[0], self.config.gradient_accumulation_steps
        epoch_batches = self.plan.batches_per_epoch
        pending, micro_batches = torch.zeros((), device=self.accelerator.device), 0
        for batch_index in range(start_batch, epoch_batches):
            inputs = next(batches)
            pending = pending + self._guarded(self.micro_step, inputs)
            micro_batches += 1
            if (batch_index + 1) % accumulate and batch_index + 1 < epoch_batches:
                continue
            loss = self._guarded(self.apply_gradients, pending / micro_batches, step + 1, epoch)
            pending, micro_batches = torch.zeros((), device=self.accelerator.device), 0
            step += 1
            self.position = (step, epoch, batch_index + 1)
            self.after_step(step, epoch, loss, bar)
            if step >= self.plan.total_steps:
                return True
        return False

    def _guarded(self, function, *args):
        try:
            return function(*args)
        except (RuntimeError, MemoryError) as error:
            message = _out_of_memory_message(self.config, error)
            if message is None:
                raise
            raise TrainingError(message) from None

    def after_step(self, step: int, epoch: int, loss: float, bar) -> None:
        if self.log is not None:
            max_norm = self.max_norm
            record = self.log.log(step, self.plan.total_steps, epoch, loss, self.lr_scheduler.get_last_lr(),
                                  max_norm.logs() if max_norm else None)
            bar.set_postfix(**(max_norm.postfix() if max_norm else {}), epoch=epoch,
                            avr_loss=f"{record.average_loss:.4f}", refresh=False)
            for callback in self.callbacks:
                callback.on_step(record, self.result.history)
        bar.update(1)
        if self.on_step:
            self.on_step(step, loss)
        if step < self.plan.total_steps:
            if self._due(self.config.save_every_n_steps, step):
                self.checkpoint(checkpoints.step_file(self.config.output_dir, self.name, step),
                                state_name(self.name, step=step), epoch)
                if self.config.save_last_n_steps or self.config.save_last_n_steps_state:
                    checkpoints.prune_steps(self.config.output_dir, self.name, step, self.config.save_last_n_steps,
                                            self.config.save_last_n_steps_state)
            # sd-scripts ignores sample_every_n_steps when sample_every_n_epochs is set
            if not self.config.sample_every_n_epochs and self._due(self.config.sample_every_n_steps, step):
                self.sample(f"{self.name}_{step:06d}")

    @contextmanager
    def averaged_weights(self):
        """A ScheduleFree optimizer trains on an interpolation of its iterates; files and samples get the averaged
        weights (its eval mode), as sd-scripts switches around each save and sample. The state is captured back in
        train mode, so a resumed run continues from exactly the weights an uninterrupted one has."""
        if self.schedule_free is None:
            yield
            return
        self.schedule_free.eval()
        try:
            yield
        finally:
            self.schedule_free.train()

    @staticmethod
    def _due(every: int | None, count: int) -> bool:
        return bool(every) and count % every == 0

    # ------------------------------------------------------------------------------------------ saving, samples
    def save(self, path: Path, epoch: int) -> Path:
        step = self.position[0]
        for key, value in self.network.state_dict().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise TrainingError(f"the adapter weight {key} is not finite at step {step}; not saving over the "
                                    "last good file. Lower the learning rate or use mixed_precision bf16/no")
        metadata = save_metadata(self.config, self.metadata, epoch, step)
        # the run's metadata is sd-scripts' whole key set; save_weights would add the network's own defaults
        saved = save_adapter_file(self.network.state_dict(), path, metadata, SAVE_DTYPES[self.config.save_precision])
        logger.info("saved %s", saved)
        self.result.saved_files.append(saved)
        return saved

    def checkpoint(self, path: Path, state_folder: str, epoch: int, final: bool = False) -> None:
        """An adapter file, and with ``save_state`` its state folder (the file first: the state says it exists);
        ``save_state_on_train_end`` adds the state of the final save only, as in sd-scripts."""
        if not self.is_main:
            return
        with self.averaged_weights():
            saved = [self.save(path, epoch)]
        if self.config.save_state or (final and self.config.save_state_on_train_end):
            folder = save_state(Path(self.config.output_dir) / state_folder, self.capture_state())
            self.result.state_dirs.append(folder)
            saved.append(folder)
        for item in saved:
            for callback in self.callbacks:
                callback.on_save(item)

    def sample(self, stem: str) -> None:
        if not self.sample_prompts or not self.is_main:
            return
        self.network.eval()
        device = self.accelerator.device
        with self.averaged_weights(), text_encoders_on(self.parts, device, self.weight_dtype):
            paths = generate_samples(self.parts, self.sample_prompts, Path(self.config.output_dir) / "sample", stem,
                                     self.config.sample_sampler, self.config.clip_skip,
                                     self.config.max_token_length)
        self.network.train()
        grid = make_grid(paths, Path(self.config.output_dir) / "sample" / f"{stem}_grid.png")
        self.result.sample_files += paths
        self.result.grid_files.append(grid)
        for callback in self.callbacks:
            callback.on_sample(paths, grid)

    def end_of_epoch(self, epoch: int) -> None:
        """Epoch saves and samples, as sd-scripts: every N epochs, but not after the last (the final save is)."""
        self.position = (self.position[0], epoch + 1, 0)
        if epoch >= self.plan.epochs:
            return
        if self._due(self.config.save_every_n_epochs, epoch):
            self.checkpoint(checkpoints.epoch_file(self.config.output_dir, self.name, epoch),
                            state_name(self.name, epoch=epoch), epoch)
            if (self.config.save_last_n_epochs or self.config.save_last_n_epochs_state) and self.is_main:
                checkpoints.prune_epochs(self.config.output_dir, self.name, self.config.save_last_n_epochs,
                                         self.config.save_last_n_epochs_state)
        if self._due(self.config.sample_every_n_epochs, epoch):
            self.sample(f"{self.name}_e{epoch:06d}")

    # --------------------------------------------------------------------------------------------------- run
    def train(self) -> TrainResult:
        """Run (or continue) every epoch; saves and samples at the configured points and at the end.

        A write that fails for want of space (or on a read-only disk) anywhere — adapter, state, sample, log — stops
        the run with one line naming the file and the last good save; atomic writes keep that save intact.
        """
        try:
            self._train()
        except OSError as error:
            failure = self._write_failure(error)
            if failure is None:
                raise
            raise failure from None
        for callback in self.callbacks:
            callback.on_end(self.result)
        return self.result

    def _train(self) -> None:
        from tqdm.auto import tqdm

        self.setup()
        started = time.time()
        step, epoch, start_batch = self.position
        bar = tqdm(total=self.plan.total_steps, initial=step, desc="steps", smoothing=0,
                   disable=not (self.progress and self.is_main))
        if self.config.sample_at_first and step == 0:
            self.sample(f"{self.name}_e000000")  # the untrained look, to compare the first epochs against
        self.network.train()
        batches = self.open_batches()
        try:
            finished = step >= self.plan.total_steps
            while not finished and epoch <= self.plan.epochs:
                finished = self.run_epoch(epoch, start_batch, bar, batches)
                if self.position[1] == epoch and self.position[2] >= self.plan.batches_per_epoch:
                    self.end_of_epoch(epoch)
                epoch, start_batch = epoch + 1, 0
            self.finish(started)
        finally:
            batches.close()  # stops the loader's workers
            bar.close()
            self._close_log()
            WORKSPACE.clear()  # the adapters' reusable full-size buffers; a notebook kernel lives on after training

    def open_batches(self) -> Iterator[BatchInputs]:
        """The rest of the run's batches, read ahead by ``max_data_loader_n_workers`` processes (at most one per
        CPU, as sd-scripts) when images are read; the result does not depend on how many (``batch_loader``)."""
        planned = plan_batches(self.dataset, self.position, self.plan.epochs, self.plan.total_steps,
                               self.config.gradient_accumulation_steps, self.world)
        reader = self.batch_reader(planned)
        workers = worker_count(self.config.max_data_loader_n_workers, reader.read_pixels)
        if workers:
            logger.info("reading images in %d data loader worker process(es)", workers)
        return iterate_batches(reader, workers)

    def _write_failure(self, error: OSError) -> TrainingError | None:
        """A failed write (disk full, …) as one line naming the file and the last good save, which is intact."""
        if not isinstance(error, WriteError) and error.errno not in DISK_ERRNOS:
            return None
        failure = as_write_error(error, error.filename or self.config.output_dir)
        step = self.position[0]
        if self.result.saved_files:
            last = f"the last good save is {self.result.saved_files[-1]}"
            if self.result.state_dirs:
                last += f' and resume = "{self.result.state_dirs[-1]}" (or "latest") continues from its state'
        elif self.result.resumed_from is not None:
            last = f"nothing was saved in this run; {self.result.resumed_from} is intact"
        else:
            last = "nothing had been saved yet"
        return TrainingError(f"{failure} — training stopped at step {step}; {last}")

    def _close_log(self) -> None:
        if self.log is None:
            return
        try:
            self.log.close()
        except OSError as error:  # a full disk fails the final flush too; the training error says why
            logger.warning("could not finish the loss log: %s", error)

    def finish(self, started: float) -> None:
        step, epoch, _ = self.position
        self.result.seconds = time.time() - started
        self.result.total_steps, self.result.epochs = step, min(epoch, self.plan.epochs)
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return
        self.checkpoint(checkpoints.final_file(self.config.output_dir, self.name), state_name(self.name),
                        self.result.epochs, final=True)
        if self._due(self.config.sample_every_n_epochs, self.result.epochs):  # sd-scripts: the last epoch's round
            self.sample(f"{self.name}_e{self.result.epochs:06d}")
        log_dir = Path(self.config.logging_dir or self.config.output_dir)
        self.result.loss_plot = self.result.history.plot(log_dir / f"{self.config.log_prefix or ''}loss.png",
                                                         title=f"{self.config.output_name or 'training'} loss")
        logger.info("training finished: %d steps in %.1f s", step, self.result.seconds)


def train(config: TrainConfig, on_step: Callable[[int, float], None] | None = None, progress: bool = True,
          callbacks: Iterable[TrainingCallback] = ()) -> TrainResult:
    """Train an adapter as configured (continuing from ``resume`` if set) and return what was written."""
    return Trainer(config, on_step=on_step, progress=progress, callbacks=callbacks).train()
