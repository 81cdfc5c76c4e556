import numpy as np
import pytest
import torch

from lycolab.config import load_config
from lycolab.demo import draw_shape_image
from lycolab.models.load import load_stable_diffusion
from lycolab.models.text import encode_prompts
from lycolab.networks import load_network
from lycolab.networks.io import read_adapter_file
from lycolab.training import train
from lycolab.training.latent_cache import encode_latents
from lycolab.training.loop import plan_run

CAPTIONS = ["sks, red circle, blue background", "sks, yellow square, black background",
            "sks, green triangle, white background", "sks, purple circle, orange background"]
SHAPES = [("circle", "red", "blue"), ("square", "yellow", "black"), ("triangle", "green", "white"),
          ("circle", "purple", "orange")]


def _make_dataset(root):
    folder = root / "4_shapes"
    folder.mkdir(parents=True)
    for index, (shape, color, background) in enumerate(SHAPES):
        draw_shape_image((64, 64), shape, color, background).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(CAPTIONS[index], encoding="utf-8")
    return folder


def _fixed_batch_loss(parts, images_dir):
    """Loss on every training image at fixed noise and timesteps: the same numbers before and after training."""
    from PIL import Image

    pixels = torch.stack([
        torch.from_numpy(np.array(Image.open(images_dir / f"{i}.png"))).permute(2, 0, 1).float() / 127.5 - 1
        for i in range(len(SHAPES))
    ])
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        torch.manual_seed(0)
        latents = encode_latents(parts.vae, pixels).repeat(4, 1, 1, 1)
        context = encode_prompts(parts.text_encoder, parts.tokenizer, CAPTIONS * 4)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = parts.unet(noisy, timesteps, context).sample
        return torch.nn.functional.mse_loss(prediction, noise).item()


@pytest.mark.parametrize(("network_args", "learning_rate"), [
    (["algo=loha", "conv_dim=4", "conv_alpha=4"], 2e-3),
    (["algo=lokr", "conv_dim=4", "conv_alpha=4", "factor=4", "rank_dropout=0.1", "module_dropout=0.05"], 4e-3),
], ids=["loha", "lokr-with-dropouts"])
def test_training_lowers_the_loss_on_a_fixed_batch(tiny_model_dir, tmp_path, network_args, learning_rate):
    images_dir = _make_dataset(tmp_path / "train")
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(tmp_path / "train"),
        "resolution": "64", "caption_extension": ".txt", "network_module": "lycoris.kohya",
        "network_args": network_args, "network_dim": 8, "network_alpha": 8,
        "learning_rate": learning_rate, "max_train_epochs": 4, "train_batch_size": 4, "seed": 0, "cache_latents": True,
        "output_dir": str(tmp_path / "out"), "output_name": "fixed", "save_every_n_epochs": 2,
        "save_precision": "float", "network_train_unet_only": True,
    })
    result = train(config, progress=False)
    assert [p.name for p in result.saved_files] == ["fixed-000002.safetensors", "fixed.safetensors"]
    assert result.total_steps == 16 and result.loss_plot.is_file() and result.loss_csv.is_file()

    parts = load_stable_diffusion(tiny_model_dir)
    before = _fixed_batch_loss(parts, images_dir)
    load_network(result.saved_files[-1], parts.unet)
    after = _fixed_batch_loss(parts, images_dir)
    assert after < 0.9 * before, (before, after)


def test_max_train_epochs_wins_over_max_train_steps(tiny_model_dir, tmp_path):
    from lycolab.data import BucketedDataset

    _make_dataset(tmp_path / "train")
    overrides = {"pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(tmp_path / "train"),
                 "resolution": "64", "output_dir": str(tmp_path / "o"), "train_batch_size": 3}
    config = load_config(overrides={**overrides, "max_train_epochs": 2, "max_train_steps": 5})
    plan = plan_run(config, BucketedDataset(config.datasets, 3))
    assert (plan.batches_per_epoch, plan.epochs, plan.total_steps) == (6, 2, 12)  # 16 images / 3 → 6 batches
    config = load_config(overrides={**overrides, "max_train_steps": 8, "gradient_accumulation_steps": 2})
    plan = plan_run(config, BucketedDataset(config.datasets, 3))
    assert (plan.steps_per_epoch, plan.epochs, plan.total_steps) == (3, 3, 8)


def test_nan_loss_stops_with_a_clear_message_and_keeps_saves(tiny_model_dir, tmp_path):
    import pytest

    from lycolab.training import TrainingError
    from lycolab.training.loop import Trainer

    _make_dataset(tmp_path / "train")
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(tmp_path / "train"),
        "resolution": "64", "output_dir": str(tmp_path / "o"), "max_train_epochs": 3, "save_every_n_epochs": 1,
        "train_batch_size": 4, "network_dim": 4,
    })
    trainer = Trainer(config, progress=False)
    original = Trainer.loss_sum

    def poisoned(self, inputs, draws):
        loss = original(self, inputs, draws)
        return loss * float("nan") if inputs.planned.epoch == 2 else loss

    trainer.loss_sum = poisoned.__get__(trainer)
    with pytest.raises(TrainingError, match="loss became nan at epoch 2, step 5; stopped, the last save is intact"):
        trainer.train()
    assert [p.name for p in (tmp_path / "o").glob("*.safetensors")] == ["last-000001.safetensors"]
    weights, _ = read_adapter_file(tmp_path / "o" / "last-000001.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values())


def test_training_with_a_regularization_subset_flip_aug_and_disk_cache(tiny_model_dir, tmp_path):
    import json

    from safetensors import safe_open

    train_dir = _make_dataset(tmp_path / "train")
    reg_dir = tmp_path / "reg"
    reg_dir.mkdir()
    for index in range(2):
        draw_shape_image((64, 64), "square", "red", "white").save(reg_dir / f"r{index}.png")
    dataset_file = tmp_path / "dataset_config.toml"
    dataset_file.write_text(
        "[general]\nresolution = 64\ncaption_extension = \".txt\"\n[[datasets]]\nbatch_size = 2\n"
        f"[[datasets.subsets]]\nimage_dir = \"{train_dir}\"\nnum_repeats = 2\nflip_aug = true\n"
        f"[[datasets.subsets]]\nimage_dir = \"{reg_dir}\"\nis_reg = true\nclass_tokens = \"square\"\n",
        encoding="utf-8")
    config = load_config(dataset_config=dataset_file, overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
        "output_name": "reg", "max_train_epochs": 1, "prior_loss_weight": 0.5, "cache_latents_to_disk": True,
        "network_dim": 4, "save_precision": "float", "seed": 1,
    })
    result = train(config, progress=False)
    assert result.total_steps == 8  # 4 images x 2 repeats + reg balanced to 8, batch 2
    with safe_open(str(result.saved_files[-1]), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_num_reg_images"] == "2" and metadata["ss_prior_loss_weight"] == "0.5"  # raw count (sd-scripts)
    assert json.loads(metadata["ss_dataset_dirs"])
    assert len(list(train_dir.glob("*.latents.safetensors"))) == 4 and len(list(reg_dir.glob("*.latents.*"))) == 2
