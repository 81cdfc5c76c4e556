"""``lycolab demo``: the whole product end to end with nothing downloaded — and proof that training learns.

Writes the embedded tiny SD (pretrained to draw simple scenes, :mod:`lycolab.models.scenes`) as a diffusers
folder, draws a small dataset of a combination the model never saw (a yellow circle on a purple background)
captioned with a made-up trigger word, writes both kohya TOML files the way the configure notebook does, reads them
back like a user's files and trains. Then it draws the trigger word's prompt with and without the adapter, measures
how often each shows the concept (a pixel-statistics classifier) and puts both side by side in
``output/compare.png``. Every step is the real code path; only the model is small.
"""

from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lycolab.config import DatasetConfig, TrainConfig, load_config, write_config_file, write_dataset_config
from lycolab.data.scan import discover_subsets
from lycolab.models.scenes import (
    COLORS,
    CONCEPT,
    SCENE_SIZE,
    SHAPES,
    TRIGGER_WORD,
    concept_score,
    draw_scene,
    draw_shape_image,
)
from lycolab.training.loop import TrainResult, train
from lycolab.training.sampling import make_grid

logger = logging.getLogger(__name__)

__all__ = ["ALGO_NETWORKS", "COLORS", "SHAPES", "DemoResult", "draw_shape_image", "make_concept_dataset", "render",
           "run_demo"]

# (folder, size, images): 16 images of the concept in two aspect ratios
CONCEPT_SETS = ((f"5_{TRIGGER_WORD}", (SCENE_SIZE, SCENE_SIZE), 12), (f"5_{TRIGGER_WORD} tall", (SCENE_SIZE, 96), 4))
SAMPLES = 16  # images per side of the comparison, seeds 0..15
SAMPLE_STEPS, GUIDANCE = 20, 2.0  # low guidance: with the adapter on, the unconditional side moves too
ALGO_NETWORKS = {
    "lora": ("networks.lora", []),
    "locon": ("networks.lora", ["conv_dim=4", "conv_alpha=2"]),
    "loha": ("lycoris.kohya", ["algo=loha", "conv_dim=4", "conv_alpha=2"]),
    "lokr": ("lycoris.kohya", ["algo=lokr", "conv_dim=4", "conv_alpha=2", "factor=4"]),
}


@dataclass
class DemoResult:
    out_dir: Path
    config_file: Path
    dataset_config: Path
    training: TrainResult
    base_score: float = 0.0
    adapter_score: float = 0.0
    compare: Path | None = None


def make_concept_dataset(train_dir: Path, seed: int = 0) -> list[Path]:
    """The concept drawn (size and place varied) in a square and a portrait set, so bucketing makes two buckets;
    each image captioned with the trigger word alone."""
    rng = random.Random(seed)
    folders = []
    for folder_name, size, count in CONCEPT_SETS:
        folder = train_dir / folder_name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            draw_scene(CONCEPT, rng, size).save(folder / f"{index:03d}.png")
            (folder / f"{index:03d}.txt").write_text(TRIGGER_WORD + "\n", encoding="utf-8")
        folders.append(folder)
    return folders


# SDXL's defaults as the configure notebook sets them: the U-Net alone, its text-encoder outputs cached
SDXL_SETTINGS = {"network_train_unet_only": True, "cache_text_encoder_outputs": True}
MODEL_FOLDERS = {"sd": "tiny-sd", "sdxl": "tiny-sdxl"}


def demo_config(out_dir: Path, algo: str, epochs: int, arch: str = "sd", **overrides) -> TrainConfig:
    """The settings the configure notebook would write for this data, scaled to the tiny model."""
    network_module, network_args = ALGO_NETWORKS[algo]
    settings = dict(
        pretrained_model_name_or_path=str(out_dir / "models" / MODEL_FOLDERS[arch]),
        network_module=network_module, network_dim=8, network_alpha=4, network_args=network_args,
        optimizer_type="AdamW", learning_rate=2e-3, unet_lr=2e-3, text_encoder_lr=1e-3,
        lr_scheduler="constant_with_warmup", lr_warmup_steps=5,
        cache_latents=True, vae_batch_size=8,
        output_dir=str(out_dir / "output"), output_name=f"demo_{algo}", save_precision="fp16",
        save_every_n_epochs=max(1, epochs // 3), train_batch_size=4, max_train_epochs=epochs, seed=42,
        mixed_precision="no", logging_dir=str(out_dir / "logs"),
        sample_every_n_epochs=max(1, epochs // 3), sample_sampler="ddim",
        sample_prompts=str(out_dir / "config" / "sample_prompt.txt"),
        dataset_config=str(out_dir / "config" / "dataset_config.toml"),
    )
    settings.update(SDXL_SETTINGS if arch == "sdxl" else {})
    settings.update(overrides)
    return TrainConfig(**settings)


def demo_datasets(train_dir: Path) -> list[DatasetConfig]:
    subsets = discover_subsets(train_dir)
    for subset in subsets:
        subset.caption_extension = ".txt"
    return [DatasetConfig(subsets=subsets, resolution=(SCENE_SIZE, SCENE_SIZE), enable_bucket=True,
                          min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, bucket_no_upscale=False)]


def render(model: str | Path, prompt: str, count: int = SAMPLES, networks: list[tuple[Path, float]] | None = None
           ) -> list[Image.Image]:
    """``count`` images of ``prompt`` (seeds 0, 1, …) through ``lycolab generate``'s code path."""
    from lycolab.models.generate import generate

    lines = [f"{prompt} --w {SCENE_SIZE} --h {SCENE_SIZE} --s {SAMPLE_STEPS} --l {GUIDANCE} --d {seed}"
             for seed in range(count)]
    with tempfile.TemporaryDirectory() as folder:
        paths = generate(model, lines, folder, networks or [], sampler="ddim")
        return [Image.open(path).convert("RGB") for path in paths]


def run_demo(out_dir: str | Path, algo: str = "loha", epochs: int = 10, progress: bool = True, arch: str = "sd",
             **overrides) -> DemoResult:
    """Build, write, read back, train, and measure the concept with and without the adapter.

    ``arch="sdxl"`` runs the same on a tiny SDXL built in code (random weights: its score shows nothing learned,
    only that SDXL's whole path — two text encoders, size conditioning, the SDXL pipeline — works)."""
    from lycolab.models.tiny import save_tiny_sd
    from lycolab.models.tiny_sdxl import save_tiny_sdxl

    if algo not in ALGO_NETWORKS:
        raise ValueError(f"demo algo must be one of {', '.join(ALGO_NETWORKS)}, got {algo!r}")
    if arch not in MODEL_FOLDERS:
        raise ValueError(f"demo arch must be one of {', '.join(MODEL_FOLDERS)}, got {arch!r}")
    out_dir = Path(out_dir).resolve()
    model = out_dir / "models" / MODEL_FOLDERS[arch]
    logger.info("writing the tiny %s to %s", "SDXL" if arch == "sdxl" else "Stable Diffusion", model)
    (save_tiny_sdxl if arch == "sdxl" else save_tiny_sd)(model)
    make_concept_dataset(out_dir / "train_data")
    config_dir = out_dir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "sample_prompt.txt").write_text(
        f"{TRIGGER_WORD} --w {SCENE_SIZE} --h {SCENE_SIZE} --s {SAMPLE_STEPS} --l {GUIDANCE} --d 1\n"
        f"a red square on a white background --w {SCENE_SIZE} --h {SCENE_SIZE} --s {SAMPLE_STEPS} --d 2\n",
        encoding="utf-8")
    dataset_file = write_dataset_config(demo_datasets(out_dir / "train_data"), config_dir / "dataset_config.toml")
    config_file = write_config_file(demo_config(out_dir, algo, epochs, arch, **overrides),
                                    config_dir / "config_file.toml")
    training = train(load_config(config_file), progress=progress)
    base = render(model, TRIGGER_WORD)
    adapted = render(model, TRIGGER_WORD, networks=[(training.saved_files[-1], 1.0)])
    result = DemoResult(out_dir, config_file, dataset_file, training, concept_score(base), concept_score(adapted))
    result.compare = make_grid(base + adapted, out_dir / "output" / "compare.png", columns=SAMPLES)  # 2 rows
    logger.info("concept %r (%s %s on %s): base model %.0f %%, with the adapter %.0f %% of %d samples",
                TRIGGER_WORD, CONCEPT.color, CONCEPT.shape, CONCEPT.background, 100 * result.base_score,
                100 * result.adapter_score, SAMPLES)
    return result
