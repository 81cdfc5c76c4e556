"""DataLoader workers (max_data_loader_n_workers) read ahead without changing a bit of what is trained."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPE_IMAGES, draw_shape_image
from safetensors.torch import load_file

from lycolab.config import load_config
from lycolab.data.dataset import BucketedDataset
from lycolab.training import train
from lycolab.training.batch_loader import RunBatches, iterate_batches, plan_batches, worker_count
from lycolab.training.loop import plan_run


def make_dataset(root):
    """Four captioned shape images larger than the 64 px resolution (so random crops have room), 2 repeats."""
    folder = root / "2_shapes"
    folder.mkdir(parents=True)
    for index, (shape, color, background) in enumerate(SHAPE_IMAGES):
        draw_shape_image((80 + 8 * index, 96), shape, color, background).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"sks, {color} {shape}, {background} background, plain",
                                             encoding="utf-8")
    return root


def _config(model, data, out, **extra):
    """Everything the loader decides switched on: random crops, flips, caption shuffling and dropout, images read
    every step (no latent cache), with two images per batch."""
    return load_config(overrides={
        "pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "resolution": "64",
        "caption_extension": ".txt", "shuffle_caption": True, "caption_tag_dropout_rate": 0.3, "flip_aug": True,
        "random_crop": True, "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-3, "max_train_epochs": 2,
        "train_batch_size": 2, "seed": 11, "output_dir": str(out), "save_precision": "float", **extra,
    })


def test_adapters_are_bit_identical_for_0_1_and_2_loader_workers(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "train")
    runs = {workers: train(_config(tiny_model_dir, data, tmp_path / f"w{workers}",
                                   max_data_loader_n_workers=workers), progress=False)
            for workers in (0, 1, 2)}
    reference = load_file(str(runs[0].saved_files[-1]))
    for workers in (1, 2):
        weights = load_file(str(runs[workers].saved_files[-1]))
        assert [key for key in reference if not torch.equal(reference[key], weights[key])] == []
        assert runs[workers].history.losses == runs[0].history.losses


def _dataset(tmp_path) -> BucketedDataset:
    config = _config("unused", make_dataset(tmp_path / "train"), tmp_path / "o")
    return BucketedDataset(config.datasets, config.train_batch_size, seed=3)


@pytest.mark.parametrize(("accumulation", "total_steps", "start"), [
    (1, 8, (0, 1, 0)), (3, 5, (0, 1, 0)), (3, 4, (2, 1, 3)), (2, 3, (2, 2, 0)), (1, 8, (4, 1, 4))])
def test_the_plan_holds_each_batch_once_with_the_steps_taken_before_it(tmp_path, accumulation, total_steps, start):
    dataset = _dataset(tmp_path)  # 8 images with repeats, batches of 2: 4 batches per epoch
    plan = plan_run(load_config(overrides={"max_train_steps": total_steps, "output_dir": "o",
                                           "train_data_dir": str(tmp_path / "train"),
                                           "gradient_accumulation_steps": accumulation}), dataset)
    planned = plan_batches(dataset, start, plan.epochs, total_steps, accumulation)
    step, epoch, first = start
    expected = []
    for current in range(epoch, plan.epochs + 1):
        batches = dataset.make_batches(current)
        begin = first if current == epoch else 0
        for batch_index in range(begin, len(batches)):
            if step >= total_steps:
                break
            expected.append((current, batch_index, tuple(batches[batch_index]), step))
            if (batch_index + 1) % accumulation == 0 or batch_index + 1 == len(batches):
                step += 1
    assert [(p.epoch, p.batch_index, p.items, p.steps_before) for p in planned] == expected


def test_workers_read_the_same_inputs_in_the_same_order_as_the_training_process(tmp_path):
    dataset = _dataset(tmp_path)
    batches = RunBatches(dataset, plan_batches(dataset, (0, 1, 0), 2, 8, 1), seed=5, total_steps=8,
                         read_pixels=True)
    here, ahead = list(iterate_batches(batches, 0)), list(iterate_batches(batches, 2))
    assert len(here) == len(ahead) == 8
    for mine, theirs in zip(here, ahead, strict=True):
        assert (mine.planned, mine.flips, mine.captions) == (theirs.planned, theirs.flips, theirs.captions)
        assert torch.equal(mine.pixels, theirs.pixels)


def test_workers_follow_sd_scripts_count_and_are_not_started_without_images_to_read(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert worker_count(8, read_pixels=True) == 2  # sd-scripts: min(max_data_loader_n_workers, os.cpu_count())
    assert worker_count(1, read_pixels=True) == 1
    assert worker_count(8, read_pixels=False) == 0  # cached latents: only captions, read in the loop
