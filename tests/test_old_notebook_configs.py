"""TOML files as the old "Kohya LoRA Dreambooth" Colab writes them load, for every combination its forms allow, and
train on the tiny model.

The generator copies the notebook's own code: Linaqruf/kohya-trainer, kohya-LoRA-dreambooth.ipynb as of commit
31118361d856b3e438db93a67873935b0b7c67d1 (the last one to change it; HEAD c2a9dc8 holds the same file), cells
"5.2. Dataset Config", "5.3. LoRA and Optimizer Config", "5.4. Training Config" and "5.5. Start Training". Its form
lists are the same in every revision since 0567e7e (March 2023) but 89dd945, which was reverted five minutes later.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import math
import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import tomli_w
import tomllib
import torch
from conftest import SHAPE_IMAGES
from safetensors import safe_open

from lycolab.cli import build_parser, parse_overrides
from lycolab.config import ConfigError, TrainConfig, load_config, network_args_dict
from lycolab.demo import draw_shape_image
from lycolab.training import train
from lycolab.training.metadata import optimizer_metadata
from lycolab.training.optim import build_optimizer
from lycolab.training.sampling import generate_samples, read_prompt_file
from lycolab.training.schedule import lr_scheduler_for

# The notebook's #@param lists, in its order.
NETWORK_CATEGORIES = ("LoRA", "LoCon", "LoCon_Lycoris", "LoHa")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "SGDNesterov", "SGDNesterov8bit", "DAdaptation", "AdaFactor")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "adafactor")
SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
SAMPLING = (True, False)  # enable_sample_prompt


@dataclass
class Form:
    """The notebook's other form fields at their defaults; tests shrink a few of them for a CPU run."""

    dataset_repeats: int = 10
    activation_word: str = "mksks"
    caption_extension: str = ".txt"
    resolution: int = 512
    flip_aug: bool = False
    keep_tokens: int = 0
    v2: bool = False
    v_parameterization: bool = False
    project_name: str = ""
    vae: str = ""
    conv_dim: int = 32
    conv_alpha: int = 16
    network_dim: int = 32
    network_alpha: int = 16
    network_weight: str = ""
    min_snr_gamma: float = -1
    optimizer_args: str = ""
    train_unet: bool = True
    unet_lr: float = 1e-4
    train_text_encoder: bool = True
    text_encoder_lr: float = 5e-5
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 0
    lr_scheduler_power: float = 0
    lowram: bool = True
    sampler: str = "ddim"
    noise_offset: float = 0.0
    num_epochs: int = 10
    vae_batch_size: int = 4
    train_batch_size: int = 6
    mixed_precision: str = "fp16"
    save_precision: str = "fp16"
    save_n_epochs_type: str = "save_every_n_epochs"
    save_n_epochs_type_value: int = 1
    save_model_as: str = "safetensors"
    max_token_length: int = 225
    clip_skip: int = 2
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    seed: int = -1
    sample_width: int = 512  # not form fields: the notebook's sample prompt is fixed text
    sample_height: int = 768
    sample_steps: int = 28


@dataclass
class NotebookFiles:
    config_file: Path
    dataset_config: Path
    sample_prompt: Path
    output_dir: Path


def _parse_folder_name(folder_name, default_num_repeats, default_class_token):
    folder_name_parts = folder_name.split("_")
    if len(folder_name_parts) == 2 and folder_name_parts[0].isdigit():
        return int(folder_name_parts[0]), folder_name_parts[1].replace("_", " ")
    return default_num_repeats, default_class_token


def _find_image_files(path):
    supported_extensions = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    return [file for file in glob.glob(path + "/**/*", recursive=True) if file.lower().endswith(supported_extensions)]


def _process_data_dir(data_dir, default_num_repeats, default_class_token, is_reg=False):
    """The notebook's process_data_dir: the folder itself, then every subfolder with images, as subsets."""
    subsets = []
    if _find_image_files(data_dir):
        subsets.append({"image_dir": data_dir, "class_tokens": default_class_token,
                        "num_repeats": default_num_repeats, **({"is_reg": is_reg} if is_reg else {})})
    for root, dirs, _files in os.walk(data_dir):
        for folder in dirs:
            folder_path = os.path.join(root, folder)
            if _find_image_files(folder_path):
                num_repeats, class_token = _parse_folder_name(folder, default_num_repeats, default_class_token)
                subset = {"image_dir": folder_path, "class_tokens": class_token, "num_repeats": num_repeats}
                if is_reg:
                    subset["is_reg"] = True
                subsets.append(subset)
    return subsets


def _toml_dumps(config: dict) -> str:
    """The notebook's "" → None pass, then ``toml.dumps``, which leaves out every None value (TOML has no null)."""
    for key in config:
        if isinstance(config[key], dict):
            for sub_key in config[key]:
                if config[key][sub_key] == "":
                    config[key][sub_key] = None
        elif config[key] == "":
            config[key] = None

    def without_none(value):
        if isinstance(value, dict):
            return {k: without_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [without_none(v) for v in value]
        return value

    return tomli_w.dumps(without_none(config))


def old_notebook_tomls(network_category: str, optimizer: str, scheduler: str, sampling: bool, tmp_path: Path,
                       pretrained_model: Path | str = "", form: Form | None = None) -> NotebookFiles:
    """config_file.toml, dataset_config.toml and sample_prompt.txt as the notebook's cells write them for these
    form choices; /content paths become folders under ``tmp_path`` (train_data there must hold the images)."""
    form = form or Form()
    training_dir = tmp_path / "LoRA"
    config_dir, output_dir = training_dir / "config", training_dir / "output"
    train_data_dir, reg_data_dir = str(training_dir / "train_data"), str(training_dir / "reg_data")
    for folder in (config_dir, output_dir, output_dir / "sample"):
        folder.mkdir(parents=True, exist_ok=True)
    project_name = form.project_name or "last"

    # 5.2. Dataset Config
    subsets = (_process_data_dir(train_data_dir, form.dataset_repeats, form.activation_word)
               + _process_data_dir(reg_data_dir, form.dataset_repeats, form.activation_word, is_reg=True))
    dataset = {
        "general": {
            "enable_bucket": True,
            "caption_extension": form.caption_extension,
            "shuffle_caption": True,
            "keep_tokens": form.keep_tokens,
            "bucket_reso_steps": 64,
            "bucket_no_upscale": False,
        },
        "datasets": [
            {
                "resolution": form.resolution,
                "min_bucket_reso": 320 if form.resolution > 640 else 256,
                "max_bucket_reso": 1280 if form.resolution > 640 else 1024,
                "caption_dropout_rate": 0,
                "caption_tag_dropout_rate": 0,
                "caption_dropout_every_n_epochs": 0,
                "flip_aug": form.flip_aug,
                "color_aug": False,
                "face_crop_aug_range": None,
                "subsets": subsets,
            }
        ],
    }

    # 5.3. LoRA and Optimizer Config
    network_module = "lycoris.kohya" if network_category in ["LoHa", "LoCon_Lycoris"] else "networks.lora"
    network_args = "" if network_category == "LoRA" else [f"conv_dim={form.conv_dim}", f"conv_alpha={form.conv_alpha}"]
    if network_category == "LoHa":
        network_args.append("algo=loha")
    elif network_category == "LoCon_Lycoris":
        network_args.append("algo=lora")

    # 5.4. Training Config
    sample_str = f"""
  masterpiece, best quality, 1girl, aqua eyes, baseball cap, blonde hair, closed mouth, earrings, green background, hat, hoop earrings, jewelry, looking at viewer, shirt, short hair, simple background, solo, upper body, yellow shirt \
  --n lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry \
  --w {form.sample_width} \
  --h {form.sample_height} \
  --l 7 \
  --s {form.sample_steps}    
"""  # noqa: E501, W291 - the notebook's text as it is
    config = {
        "model_arguments": {
            "v2": form.v2,
            "v_parameterization": form.v_parameterization if form.v2 and form.v_parameterization else False,
            "pretrained_model_name_or_path": str(pretrained_model),
            "vae": form.vae,
        },
        "additional_network_arguments": {
            "no_metadata": False,
            "unet_lr": float(form.unet_lr) if form.train_unet else None,
            "text_encoder_lr": float(form.text_encoder_lr) if form.train_text_encoder else None,
            "network_weights": form.network_weight,
            "network_module": network_module,
            "network_dim": form.network_dim,
            "network_alpha": form.network_alpha,
            "network_args": network_args,
            "network_train_unet_only": True if form.train_unet and not form.train_text_encoder else False,
            "network_train_text_encoder_only": True if form.train_text_encoder and not form.train_unet else False,
            "training_comment": None,
        },
        "optimizer_arguments": {
            "min_snr_gamma": form.min_snr_gamma if not form.min_snr_gamma == -1 else None,
            "optimizer_type": optimizer,
            "learning_rate": form.unet_lr,
            "max_grad_norm": 1.0,
            "optimizer_args": eval(form.optimizer_args) if form.optimizer_args else None,  # as the notebook reads it
            "lr_scheduler": scheduler,
            "lr_warmup_steps": form.lr_warmup_steps,
            "lr_scheduler_num_cycles": form.lr_scheduler_num_cycles if scheduler == "cosine_with_restarts" else None,
            "lr_scheduler_power": form.lr_scheduler_power if scheduler == "polynomial" else None,
        },
        "dataset_arguments": {
            "cache_latents": True,
            "debug_dataset": False,
            "vae_batch_size": form.vae_batch_size,
        },
        "training_arguments": {
            "output_dir": str(output_dir),
            "output_name": project_name,
            "save_precision": form.save_precision,
            "save_every_n_epochs": (form.save_n_epochs_type_value if form.save_n_epochs_type == "save_every_n_epochs"
                                    else None),
            "save_n_epoch_ratio": (form.save_n_epochs_type_value if form.save_n_epochs_type == "save_n_epoch_ratio"
                                   else None),
            "save_last_n_epochs": None,
            "save_state": None,
            "save_last_n_epochs_state": None,
            "resume": None,
            "train_batch_size": form.train_batch_size,
            "max_token_length": 225,
            "mem_eff_attn": False,
            "xformers": True,
            "max_train_epochs": form.num_epochs,
            "max_data_loader_n_workers": 8,
            "persistent_data_loader_workers": True,
            "seed": form.seed if form.seed > 0 else None,
            "gradient_checkpointing": form.gradient_checkpointing,
            "gradient_accumulation_steps": form.gradient_accumulation_steps,
            "mixed_precision": form.mixed_precision,
            "clip_skip": form.clip_skip if not form.v2 else None,
            "logging_dir": str(training_dir / "logs"),
            "log_prefix": project_name,
            "noise_offset": form.noise_offset if form.noise_offset > 0 else None,
            "lowram": form.lowram,
        },
        "sample_prompt_arguments": {
            "sample_every_n_steps": None,
            "sample_every_n_epochs": 1 if sampling else 999999,
            "sample_sampler": form.sampler,
        },
        "dreambooth_arguments": {
            "prior_loss_weight": 1.0,
        },
        "saving_arguments": {
            "save_model_as": form.save_model_as,
        },
    }
    files = NotebookFiles(config_dir / "config_file.toml", config_dir / "dataset_config.toml",
                          config_dir / "sample_prompt.txt", output_dir)
    files.dataset_config.write_text(_toml_dumps(dataset), encoding="utf-8")
    files.config_file.write_text(_toml_dumps(config), encoding="utf-8")
    files.sample_prompt.write_text(sample_str, encoding="utf-8")
    return files


def _start_training_args(files: NotebookFiles) -> list[str]:
    """5.5. Start Training: the notebook's own train() turns train_conf into ``--key="value"`` options for
    train_network.py; here they follow ``lycolab train`` instead."""
    train_conf = {"sample_prompts": str(files.sample_prompt), "dataset_config": str(files.dataset_config),
                  "config_file": str(files.config_file)}
    args = ""
    for k, v in train_conf.items():
        if k.startswith("_"):
            args += f'"{v}" '
        elif isinstance(v, str):
            args += f'--{k}="{v}" '
        elif isinstance(v, bool) and v:
            args += f"--{k} "
        elif isinstance(v, (float, int)) and not isinstance(v, bool):
            args += f"--{k}={v} "
    return shlex.split(args)


def _load(files: NotebookFiles) -> TrainConfig:
    """The notebook's command line, read as ``lycolab train`` reads it."""
    args, extra = build_parser().parse_known_args(["train", *_start_training_args(files)])
    return load_config(args.config_file, args.dataset_config, parse_overrides(extra))


def _upload_images(tmp_path: Path, count: int) -> None:
    """Captioned images straight into /content/LoRA/train_data, where the notebook's upload cell puts them."""
    folder = tmp_path / "LoRA" / "train_data"
    folder.mkdir(parents=True, exist_ok=True)
    for index, (shape, color, background) in enumerate(SHAPE_IMAGES[:count]):
        draw_shape_image((64, 64), shape, color, background).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"mksks, {color} {shape}, {background} background", encoding="utf-8")


def _network_args(network_category: str) -> dict[str, str]:
    """What the notebook's network_args list means, for the default conv_dim/conv_alpha."""
    if network_category == "LoRA":
        return {}
    algo = {"LoHa": {"algo": "loha"}, "LoCon_Lycoris": {"algo": "lora"}}.get(network_category, {})
    return {"conv_dim": "32", "conv_alpha": "16", **algo}


def _refused(optimizer: str, scheduler: str) -> bool:
    """sd-scripts asserts "adafactor scheduler must be used with Adafactor optimizer"; lycolab says so at load."""
    return scheduler == "adafactor" and optimizer != "AdaFactor"


# ----------------------------------------------------------------------------------------------------------- loading

ALL_COMBINATIONS = [
    pytest.param(category, optimizer, scheduler, sampling,
                 id=f"{category}-{optimizer}-{scheduler}-{'sampling' if sampling else 'no_sampling'}")
    for category in NETWORK_CATEGORIES for optimizer in OPTIMIZERS for scheduler in SCHEDULERS
    for sampling in SAMPLING
]


@pytest.mark.parametrize(("network_category", "optimizer", "scheduler", "sampling"), ALL_COMBINATIONS)
def test_every_form_combination_loads(tmp_path, tiny_model_dir, network_category, optimizer, scheduler, sampling):
    _upload_images(tmp_path, 1)
    files = old_notebook_tomls(network_category, optimizer, scheduler, sampling, tmp_path, tiny_model_dir)
    if _refused(optimizer, scheduler):
        with pytest.raises(ConfigError) as caught:
            _load(files)
        assert str(caught.value) == (
            f'{files.config_file}: lr_scheduler "adafactor" only works with optimizer_type = "AdaFactor" and its '
            'relative_step (the default there: remove relative_step=False)')
        return
    config = _load(files)
    assert (config.network_module, network_args_dict(config)) == (
        "lycoris.kohya" if network_category in ("LoHa", "LoCon_Lycoris") else "networks.lora",
        _network_args(network_category))
    assert (config.network_dim, config.network_alpha, config.unet_lr, config.text_encoder_lr, config.learning_rate) \
        == (32, 16.0, 1e-4, 5e-5, 1e-4)
    assert (config.optimizer_type, config.optimizer_args, config.lr_scheduler, config.lr_warmup_steps) == (
        optimizer, [], scheduler, 0)
    # the notebook writes num_cycles/power (0) only for the schedule that takes them; otherwise sd-scripts' defaults
    assert config.lr_scheduler_num_cycles == (0 if scheduler == "cosine_with_restarts" else 1)
    assert config.lr_scheduler_power == (0.0 if scheduler == "polynomial" else 1.0)
    assert (config.sample_every_n_epochs, config.sample_every_n_steps, config.sample_sampler, config.sample_prompts) \
        == (1 if sampling else 999999, None, "ddim", str(files.sample_prompt))
    assert (config.mixed_precision, config.save_precision, config.xformers, config.clip_skip, config.max_token_length,
            config.max_train_epochs, config.train_batch_size, config.save_every_n_epochs, config.cache_latents,
            config.output_name, config.seed) == ("fp16", "fp16", True, 2, 225, 10, 6, 1, True, "last", None)
    [dataset] = config.datasets
    assert (dataset.resolution, dataset.enable_bucket, dataset.min_bucket_reso, dataset.max_bucket_reso,
            dataset.bucket_reso_steps) == ((512, 512), True, 256, 1024, 64)
    [subset] = dataset.subsets
    assert (subset.image_dir, subset.num_repeats, subset.class_tokens, subset.caption_extension,
            subset.shuffle_caption, subset.keep_tokens, subset.flip_aug, subset.is_reg) == (
        str(tmp_path / "LoRA" / "train_data"), 10, "mksks", ".txt", True, 0, False, False)


# The notebook's other choices, one at a time (each with the form's defaults for the rest).
OTHER_CHOICES = [
    *(replace(Form(), resolution=value) for value in (512, 640, 768, 896, 1024)),  # the slider's stops
    *(replace(Form(), caption_extension=value) for value in ("none", ".txt", ".caption")),
    *(replace(Form(), mixed_precision=value) for value in ("no", "fp16", "bf16")),
    *(replace(Form(), save_precision=value) for value in ("float", "fp16", "bf16")),
    *(replace(Form(), save_model_as=value) for value in ("ckpt", "pt", "safetensors")),
    replace(Form(), save_n_epochs_type="save_n_epoch_ratio"),
    replace(Form(), v2=True), replace(Form(), v2=True, v_parameterization=True),
    replace(Form(), train_unet=False), replace(Form(), train_text_encoder=False),
    replace(Form(), train_unet=False, train_text_encoder=False),
    replace(Form(), min_snr_gamma=5, noise_offset=0.1, seed=42, flip_aug=True, keep_tokens=1),
    replace(Form(), optimizer_args='["decouple=True","weight_decay=0.6"]'),  # the form's own example
]


@pytest.mark.parametrize("form", OTHER_CHOICES, ids=lambda form: str(OTHER_CHOICES.index(form)))
def test_the_other_form_choices_load(tmp_path, tiny_model_dir, form):
    _upload_images(tmp_path, 1)
    config = _load(old_notebook_tomls("LoCon", "DAdaptation", "cosine", True, tmp_path, tiny_model_dir, form))
    [dataset] = config.datasets
    assert dataset.resolution == (form.resolution, form.resolution)
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso) == ((320, 1280) if form.resolution > 640 else (256, 1024))
    assert dataset.subsets[0].caption_extension == form.caption_extension
    assert config.save_model_as == "safetensors"  # ckpt and pt are written as .safetensors, with a warning
    assert (config.v2, config.v_parameterization, config.clip_skip) == (form.v2, form.v_parameterization,
                                                                        None if form.v2 else 2)
    assert (config.unet_lr, config.text_encoder_lr) == (1e-4 if form.train_unet else None,
                                                        5e-5 if form.train_text_encoder else None)
    assert (config.network_train_unet_only, config.network_train_text_encoder_only) == (
        form.train_unet and not form.train_text_encoder, form.train_text_encoder and not form.train_unet)
    assert (config.save_every_n_epochs, config.save_n_epoch_ratio) == (
        (1, None) if form.save_n_epochs_type == "save_every_n_epochs" else (None, 1))
    assert config.optimizer_args == (["decouple=True", "weight_decay=0.6"] if form.optimizer_args else [])


# --------------------------------------------------------------------------- optimizer and schedule, every pair

def _two_groups(config: TrainConfig) -> tuple[list[torch.nn.Parameter], list[dict]]:
    """Parameter groups shaped as AdapterNetwork.parameter_groups makes them (U-Net, then text encoder)."""
    torch.manual_seed(0)
    unet, text_encoder = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    groups = [{"params": list(unet.parameters()), "lr": config.unet_lr or config.learning_rate, "name": "unet"},
              {"params": list(text_encoder.parameters()), "lr": config.text_encoder_lr or config.learning_rate,
               "name": "textencoder"}]
    return [*unet.parameters(), *text_encoder.parameters()], groups


PAIRS = [pytest.param(optimizer, scheduler, id=f"{optimizer}-{scheduler}")
         for optimizer in OPTIMIZERS for scheduler in SCHEDULERS if not _refused(optimizer, scheduler)]


@pytest.mark.parametrize(("optimizer", "scheduler"), PAIRS)
def test_every_optimizer_and_scheduler_pair_builds_and_steps(tmp_path, optimizer, scheduler):
    """What the training loop builds from a loaded notebook config (build_optimizer, lr_scheduler_for), stepped;
    the full runs below train a covering subset of these pairs."""
    _upload_images(tmp_path, 1)
    config = _load(old_notebook_tomls("LoRA", optimizer, scheduler, False, tmp_path, "model"))
    parameters, groups = _two_groups(config)
    choice = build_optimizer(config.optimizer_type, groups, config.learning_rate, config.optimizer_args)
    schedule = lr_scheduler_for(config, choice, total_steps=4)
    before = [parameter.detach().clone() for parameter in parameters]
    for _ in range(4):
        sum(parameter.pow(2).sum() for parameter in parameters).backward()
        choice.optimizer.step()
        schedule.step()
        choice.optimizer.zero_grad()
        assert all(math.isfinite(float(lr)) and float(lr) >= 0 for lr in schedule.get_last_lr())
    assert any(not torch.equal(a, b) for a, b in zip(before, parameters)), "no parameter moved"
    assert optimizer_metadata(config, choice)["ss_lr_scheduler"] == _ss_lr_scheduler(optimizer, scheduler)


def _ss_lr_scheduler(optimizer: str, scheduler: str) -> str:
    """sd-scripts' get_optimizer turns AdaFactor's relative step into the scheduler ``adafactor:<learning_rate>``."""
    return "adafactor:0.0001" if optimizer == "AdaFactor" else scheduler


# ------------------------------------------------------------------------------------------------------ samplers

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
NEEDS_SCIPY = ("lms", "k_lms")  # diffusers' LMS sampler imports scipy, which Colab has


@pytest.fixture(scope="module")
def tiny_parts(tiny_model_dir):
    from lycolab.models.load import load_stable_diffusion

    return load_stable_diffusion(tiny_model_dir)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_choice_renders_the_notebooks_sample_prompt(tmp_path, tiny_parts, sampler):
    """The sampler form list, as the loop samples (its prompt file, clip_skip 2, max_token_length 225); 4 steps
    because PNDM cannot take fewer. Without scipy, LMS is refused when the config loads, naming the fix."""
    _upload_images(tmp_path, 1)
    form = replace(Form(), sampler=sampler, sample_width=64, sample_height=64, sample_steps=4)
    files = old_notebook_tomls("LoRA", "AdamW", "constant", True, tmp_path, "model", form)
    if sampler in NEEDS_SCIPY and not HAS_SCIPY:
        with pytest.raises(ConfigError, match=f"sample_sampler {sampler} needs scipy .*: pip install scipy"):
            _load(files)
        return
    config = _load(files)
    prompts = read_prompt_file(config.sample_prompts)
    assert [(p.width, p.height, p.steps, p.guidance_scale) for p in prompts] == [(64, 64, 4, 7.0)]
    assert prompts[0].negative_prompt.startswith("lowres, bad anatomy") and config.sample_sampler == sampler
    [path] = generate_samples(tiny_parts, prompts, tmp_path / "sample", "last", config.sample_sampler,
                              config.clip_skip, config.max_token_length)
    assert path.is_file() and path.stat().st_size > 0


# ------------------------------------------------------------------------------------------------------ training

# Samplers in turn for the runs that sample.
TRAINING_SAMPLERS = ("euler_a", "ddim", "k_euler", "dpmsolver++", "heun", "dpmsingle", "euler", "k_dpm_2_a")


# Every (network category x optimizer) pair once, with the schedulers in turn (each optimizer gets four, every
# scheduler comes up) and sampling on in every third run; the full cross product is above, as loading.
def _training_cases() -> list:
    cases = []
    for i, category in enumerate(NETWORK_CATEGORIES):
        for j, optimizer in enumerate(OPTIMIZERS):
            schedulers = [name for name in SCHEDULERS if not _refused(optimizer, name)]
            scheduler, sampling = schedulers[(i + j) % len(schedulers)], (i + j) % 3 == 0
            sampler = TRAINING_SAMPLERS[len(cases) % len(TRAINING_SAMPLERS)] if sampling else "ddim"
            cases.append(pytest.param(category, optimizer, scheduler, sampling, sampler,
                                      id=f"{category}-{optimizer}-{scheduler}-{sampler if sampling else 'no'}"))
    return cases


TRAINING_CASES = _training_cases()
# The notebook's defaults with the sizes a CPU can train in seconds: two 64 px images, two steps of one image.
CPU_FORM = replace(Form(), dataset_repeats=1, resolution=64, num_epochs=1, train_batch_size=1, network_dim=4,
                   network_alpha=2, conv_dim=4, conv_alpha=2, sample_width=64, sample_height=64)
EIGHT_BIT = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
SS_OPTIMIZER = {
    "AdamW": "torch.optim.adamw.AdamW",
    "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit" if EIGHT_BIT else "torch.optim.adamw.AdamW",
    "Lion": "lion_pytorch.lion_pytorch.Lion",
    "SGDNesterov": "torch.optim.sgd.SGD(momentum=0.9)",
    "SGDNesterov8bit": f"{'bitsandbytes.optim.sgd.SGD8bit' if EIGHT_BIT else 'torch.optim.sgd.SGD'}(momentum=0.9)",
    "DAdaptation": "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint",
    "AdaFactor": "transformers.optimization.Adafactor(relative_step=True)",
}


def _cpu_sized(files: NotebookFiles) -> None:
    """At 64 px the notebook's min_bucket_reso of 256 is refused (as sd-scripts does): lower it with the size."""
    document = tomllib.loads(files.dataset_config.read_text(encoding="utf-8"))
    document["datasets"][0]["min_bucket_reso"] = 64
    files.dataset_config.write_text(tomli_w.dumps(document), encoding="utf-8")


@pytest.mark.parametrize(("network_category", "optimizer", "scheduler", "sampling", "sampler"), TRAINING_CASES)
def test_old_notebook_configs_train_on_the_tiny_model(tmp_path, tiny_model_dir, caplog, network_category, optimizer,
                                                      scheduler, sampling, sampler):
    _upload_images(tmp_path, 2)
    files = old_notebook_tomls(network_category, optimizer, scheduler, sampling, tmp_path, tiny_model_dir,
                               replace(CPU_FORM, sampler=sampler))
    _cpu_sized(files)
    with caplog.at_level(logging.WARNING):
        result = train(_load(files), progress=False)

    assert result.total_steps == 2 and result.saved_files == [files.output_dir / "last.safetensors"]
    with safe_open(str(result.saved_files[0]), "pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert metadata["ss_network_module"] == (
        "lycoris.kohya" if network_category in ("LoHa", "LoCon_Lycoris") else "networks.lora")
    expected_args = {key: value.replace("32", "4").replace("16", "2") for key, value in
                     _network_args(network_category).items()}
    assert json.loads(metadata.get("ss_network_args", "{}")) == ({**expected_args, "dropout": None} if
                                                                 expected_args else {})
    assert metadata["ss_optimizer"] == SS_OPTIMIZER[optimizer]
    assert metadata["ss_lr_scheduler"] == _ss_lr_scheduler(optimizer, scheduler)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_steps"]) == ("4", "2", "2")
    # what each category adapts: LoRA only attention/projection layers, the others the 3x3 convolutions too
    adapts_convolutions = any("_resnets_" in key for key in keys)
    assert adapts_convolutions == (network_category != "LoRA")
    assert any(".hada_w1_a" in key for key in keys) == (network_category == "LoHa")
    assert any(key.startswith("lora_te_") for key in keys) and any(key.startswith("lora_unet_") for key in keys)
    if "8bit" in optimizer and not EIGHT_BIT:
        assert f"optimizer_type {optimizer} needs a CUDA GPU (bitsandbytes)" in caplog.text
    samples = sorted(path.name for path in (files.output_dir / "sample").iterdir())
    assert samples == (["last_e000001_00.png", "last_e000001_grid.png"] if sampling else [])
