"""``lycolab demo``: the whole product end to end with nothing downloaded.

Builds the embedded tiny SD, draws a small captioned dataset in two aspect ratios, writes both kohya TOML files the
way the configure notebook does, reads them back like a user's files and trains. Every step is the real code path;
only the model is small (and random, so samples show the plumbing, not art).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from lycolab.config import DatasetConfig, TrainConfig, load_config, write_config_file, write_dataset_config
from lycolab.data.scan import discover_subsets
from lycolab.training.loop import TrainResult, train

logger = logging.getLogger(__name__)

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 180), "white": (245, 245, 245), "black": (20, 20, 20), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
# (folder, size): a square and a portrait set, so bucketing makes two buckets.
IMAGE_SETS = (("5_shapes square", (128, 128)), ("5_shapes tall", (96, 160)))
IMAGES_PER_SET = 6
ALGO_NETWORKS = {
    "lora": ("networks.lora", []),
    "locon": ("networks.lora", ["conv_dim=4", "conv_alpha=2"]),
    "loha": ("lycoris.kohya", ["algo=loha", "conv_dim=4", "conv_alpha=2"]),
    "lokr": ("lycoris.kohya", ["algo=lokr", "conv_dim=4", "conv_alpha=2"]),
}


@dataclass
class DemoResult:
    out_dir: Path
    config_file: Path
    dataset_config: Path
    training: TrainResult


def draw_shape_image(size: tuple[int, int], shape: str, color: str, background: str) -> Image.Image:
    """A flat-colour shape on a plain background: trivially captionable, so captions are exact."""
    image = Image.new("RGB", size, COLORS[background])
    draw = ImageDraw.Draw(image)
    width, height = size
    side = min(width, height) * 0.6
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(width / 2, top), (left, top + side), (left + side, top + side)], fill=COLORS[color])
    return image


def make_demo_dataset(train_dir: Path, seed: int = 0) -> None:
    """Images with ``.txt`` captions like a WD14 tagger writes: trigger word first, then comma-separated tags."""
    rng = random.Random(seed)
    for folder, size in IMAGE_SETS:
        directory = train_dir / folder
        directory.mkdir(parents=True, exist_ok=True)
        for index in range(IMAGES_PER_SET):
            shape = SHAPES[index % len(SHAPES)]
            color, background = rng.sample(sorted(COLORS), 2)
            draw_shape_image(size, shape, color, background).save(directory / f"{index:03d}.png")
            caption = f"sks, {color} {shape}, {background} background, simple background"
            (directory / f"{index:03d}.txt").write_text(caption + "\n", encoding="utf-8")


def demo_config(out_dir: Path, algo: str, epochs: int) -> TrainConfig:
    """The settings the configure notebook would write for this data, scaled to the tiny model."""
    network_module, network_args = ALGO_NETWORKS[algo]
    return TrainConfig(
        pretrained_model_name_or_path=str(out_dir / "models" / "tiny-sd"),
        network_module=network_module, network_dim=8, network_alpha=4, network_args=network_args,
        optimizer_type="AdamW", learning_rate=1e-3, unet_lr=1e-3, text_encoder_lr=5e-4,
        lr_scheduler="cosine", lr_warmup_steps=2,
        cache_latents=True, vae_batch_size=4,
        output_dir=str(out_dir / "output"), output_name=f"demo_{algo}", save_precision="fp16",
        save_every_n_epochs=1, train_batch_size=2, max_token_length=150, max_train_epochs=epochs, seed=42,
        mixed_precision="no", clip_skip=2, logging_dir=str(out_dir / "logs"),
        sample_every_n_epochs=2, sample_sampler="euler_a", sample_prompts=str(out_dir / "config" / "sample_prompt.txt"),
        dataset_config=str(out_dir / "config" / "dataset_config.toml"),
    )


def demo_datasets(train_dir: Path) -> list[DatasetConfig]:
    subsets = discover_subsets(train_dir)
    for subset in subsets:
        subset.caption_extension, subset.shuffle_caption, subset.keep_tokens = ".txt", True, 1
    return [DatasetConfig(subsets=subsets, resolution=(128, 128), enable_bucket=True, min_bucket_reso=64,
                          max_bucket_reso=256, bucket_reso_steps=32, bucket_no_upscale=False)]


def run_demo(out_dir: str | Path, algo: str = "loha", epochs: int = 4, progress: bool = True) -> DemoResult:
    """Build, write, read back and train; returns where everything went."""
    from lycolab.models.tiny import save_tiny_sd

    if algo not in ALGO_NETWORKS:
        raise ValueError(f"demo algo must be one of {', '.join(ALGO_NETWORKS)}, got {algo!r}")
    out_dir = Path(out_dir).resolve()
    logger.info("building the tiny Stable Diffusion in %s", out_dir / "models" / "tiny-sd")
    save_tiny_sd(out_dir / "models" / "tiny-sd")
    make_demo_dataset(out_dir / "train_data")
    config_dir = out_dir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "sample_prompt.txt").write_text(
        "sks, red circle, blue background --n lowres, blurry --w 128 --h 128 --s 12 --l 7 --d 1\n"
        "sks, yellow triangle, black background --w 96 --h 160 --s 12 --l 7 --d 2\n", encoding="utf-8")
    dataset_file = write_dataset_config(demo_datasets(out_dir / "train_data"), config_dir / "dataset_config.toml")
    config_file = write_config_file(demo_config(out_dir, algo, epochs), config_dir / "config_file.toml")
    config = load_config(config_file)
    return DemoResult(out_dir, config_file, dataset_file, train(config, progress=progress))
