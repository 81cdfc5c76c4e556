"""A trained file carries every ``ss_*`` and ``modelspec.*`` key sd-scripts' train_network.py writes for the same run,
in the same formats (checked against key lists read off sd-scripts' source, train_network.py NetworkTrainer.train())."""

from __future__ import annotations

import datetime
import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from lycolab.config import TrainConfig, load_config
from lycolab.demo import draw_shape_image
from lycolab.training import train
from lycolab.training.metadata import (
    MINIMUM_KEYS,
    file_sha256,
    legacy_model_hash,
    model_keys,
    model_spec,
    optimizer_metadata,
    save_metadata,
)

# train_network.py NetworkTrainer.train(): the `metadata = {…}` literal, written for every run (sd-scripts at
# 48d368f, Feb 2026). Values are str()'d: None → "None".
SD_SCRIPTS_RUN_KEYS = {
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_text_encoder_lr",
    "ss_unet_lr", "ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images", "ss_num_batches_per_epoch",
    "ss_num_epochs", "ss_gradient_checkpointing", "ss_gradient_accumulation_steps", "ss_max_train_steps",
    "ss_lr_warmup_steps", "ss_lr_scheduler", "ss_network_module", "ss_network_dim", "ss_network_alpha",
    "ss_network_dropout", "ss_mixed_precision", "ss_full_fp16", "ss_v2", "ss_base_model_version", "ss_clip_skip",
    "ss_max_token_length", "ss_cache_latents", "ss_seed", "ss_lowram", "ss_noise_offset",
    "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale", "ss_zero_terminal_snr",
    "ss_training_comment", "ss_sd_scripts_commit_hash", "ss_optimizer", "ss_max_grad_norm", "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate", "ss_face_crop_aug_range",
    "ss_prior_loss_weight", "ss_min_snr_gamma", "ss_scale_weight_norms", "ss_ip_noise_gamma",
    "ss_debiased_estimation", "ss_noise_offset_random_strength", "ss_ip_noise_gamma_random_strength", "ss_loss_type",
    "ss_huber_schedule", "ss_huber_scale", "ss_huber_c", "ss_fp8_base", "ss_fp8_base_unet", "ss_validation_seed",
    "ss_validation_split", "ss_max_validation_steps", "ss_validate_every_n_epochs", "ss_validate_every_n_steps",
    "ss_resize_interpolation",
}
# train(), `if use_user_config:` branch (a dataset_config is given).
SD_SCRIPTS_DATASET_CONFIG_KEYS = {"ss_datasets", "ss_tag_frequency", "ss_dataset_dirs"}
# train(), the `else:` branch (train_data_dir / reg_data_dir), kept "for backward compatibility".
SD_SCRIPTS_TRAIN_DATA_DIR_KEYS = {
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
    "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency",
    "ss_bucket_info",
}
# train(): `if args.network_args:`, and the model keys for a pretrained_model_name_or_path that exists on disk.
SD_SCRIPTS_NETWORK_ARGS_KEYS = {"ss_network_args"}
SD_SCRIPTS_MODEL_KEYS = {"ss_sd_model_hash", "ss_new_sd_model_hash", "ss_sd_model_name"}
# save_model(): per save; networks/lora.py save_weights(): the additional-networks hashes.
SD_SCRIPTS_SAVE_KEYS = {"ss_training_finished_at", "ss_steps", "ss_epoch", "sshs_model_hash", "sshs_legacy_hash"}
# train_util.get_sai_model_spec → sai_model_spec.build_metadata for a LoRA without metadata_* options
# (encoder_layer only with clip_skip; implementation_version is "sd-scripts/<commit>" there, "lycolab/<v>" here).
SD_SCRIPTS_MODELSPEC_KEYS = {
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution", "modelspec.date", "modelspec.prediction_type", "modelspec.implementation_version",
}
# The per-dataset and per-subset entries of ss_datasets (train(), dataset_metadata / subset_metadata, DreamBooth).
SD_SCRIPTS_DATASET_ENTRY_KEYS = {
    "is_dreambooth", "batch_size_per_device", "num_train_images", "num_reg_images", "resolution", "enable_bucket",
    "min_bucket_reso", "max_bucket_reso", "tag_frequency", "bucket_info", "resize_interpolation", "subsets",
}
SD_SCRIPTS_SUBSET_ENTRY_KEYS = {
    "img_count", "num_repeats", "color_aug", "flip_aug", "random_crop", "shuffle_caption", "keep_tokens",
    "keep_tokens_separator", "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
    "resize_interpolation", "image_dir", "class_tokens", "is_reg",
}

SHAPES = [("circle", "red", "blue"), ("square", "yellow", "black"), ("triangle", "green", "white")]


def _images(folder, count, size=(64, 64), captions=True):
    folder.mkdir(parents=True)
    for index, (shape, color, background) in enumerate(SHAPES[:count]):
        draw_shape_image(size, shape, color, background).save(folder / f"{index}.png")
        if captions:
            (folder / f"{index}.txt").write_text(f"sks, {color} {shape}, {background} background", encoding="utf-8")
    return folder


def _metadata(path):
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def _overrides(tiny_model_dir, tmp_path, **more):
    return {"pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
            "output_name": "meta", "max_train_epochs": 1, "network_dim": 4, "network_alpha": 2, "seed": 1,
            "save_precision": "float", **more}


@pytest.fixture(scope="module")
def dataset_config_run(tiny_model_dir, tmp_path_factory):
    """A LoHa run from a dataset_config: two training folders and a regularisation folder, all named "shapes"."""
    tmp_path = tmp_path_factory.mktemp("metadata_run")
    first = _images(tmp_path / "a" / "shapes", 2)
    second = _images(tmp_path / "b" / "shapes", 1, size=(80, 64))
    (second / "0.txt").write_text("SKS, Blue Circle", encoding="utf-8")
    reg = _images(tmp_path / "c" / "shapes", 3, captions=False)
    dataset_file = tmp_path / "dataset_config.toml"
    dataset_file.write_text(
        "[general]\nresolution = 64\ncaption_extension = \".txt\"\nenable_bucket = true\nmin_bucket_reso = 64\n"
        "max_bucket_reso = 128\nbucket_reso_steps = 64\n[[datasets]]\nbatch_size = 2\n"
        f"[[datasets.subsets]]\nimage_dir = \"{first}\"\nnum_repeats = 2\n"
        f"[[datasets.subsets]]\nimage_dir = \"{second}\"\nnum_repeats = 1\n"
        f"[[datasets.subsets]]\nimage_dir = \"{reg}\"\nis_reg = true\nclass_tokens = \"Shape\"\n",
        encoding="utf-8")
    config = load_config(dataset_config=dataset_file, overrides=_overrides(
        tiny_model_dir, tmp_path, network_module="lycoris.kohya",
        network_args=["algo=loha", "conv_dim=2", "conv_alpha=1"], clip_skip=2))
    result = train(config, progress=False)
    return config, result, _metadata(result.saved_files[-1])


def test_dataset_config_run_writes_exactly_sd_scripts_keys(dataset_config_run):
    _, result, metadata = dataset_config_run
    expected = (SD_SCRIPTS_RUN_KEYS | SD_SCRIPTS_DATASET_CONFIG_KEYS | SD_SCRIPTS_NETWORK_ARGS_KEYS
                | SD_SCRIPTS_MODEL_KEYS | SD_SCRIPTS_SAVE_KEYS | SD_SCRIPTS_MODELSPEC_KEYS
                | {"modelspec.encoder_layer"})  # clip_skip = 2
    assert set(metadata) == expected, (set(metadata) - expected, expected - set(metadata))
    assert all(isinstance(value, str) for value in metadata.values())
    # 2 images x 2 + 1 x 1 training images, 3 regularisation images balanced to 5: 10 per epoch, batch 2.
    assert result.total_steps == 5
    assert metadata["ss_max_train_steps"] == "5"  # the computed total, not max_train_steps' default 1600
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"]) == ("5", "3")  # reg: raw, as sd-scripts
    assert (metadata["ss_num_batches_per_epoch"], metadata["ss_num_epochs"], metadata["ss_num_validation_images"]) == (
        "5", "1", "0")
    assert (metadata["ss_epoch"], metadata["ss_steps"]) == ("1", "5")


def test_dataset_config_run_values_have_sd_scripts_formats(dataset_config_run):
    config, _, metadata = dataset_config_run
    assert metadata["ss_dataset_dirs"] and json.loads(metadata["ss_dataset_dirs"]) == {
        "shapes": {"n_repeats": 2, "img_count": 2}, "shapes (2)": {"n_repeats": 1, "img_count": 1}}  # no reg folder
    frequency = json.loads(metadata["ss_tag_frequency"])
    assert list(frequency) == ["shapes"]  # folders sharing a base name share one count, reg images included
    assert frequency["shapes"]["sks"] == 3 and frequency["shapes"]["blue circle"] == 1
    assert frequency["shapes"]["shape"] == 3  # the reg images' class_tokens, lower-cased
    assert all(tag == tag.lower() for tag in frequency["shapes"])
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha", "conv_dim": "2", "conv_alpha": "1",
                                                       "dropout": None}
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (
        "lycoris.kohya", "4", "2")
    assert (metadata["ss_network_dropout"], metadata["ss_noise_offset"], metadata["ss_training_comment"]) == (
        "None", "None", "None")
    assert (metadata["ss_v2"], metadata["ss_base_model_version"], metadata["ss_cache_latents"]) == (
        "False", "sd_v1", "False")
    assert (metadata["ss_seed"], metadata["ss_clip_skip"], metadata["ss_output_name"]) == ("1", "2", "meta")
    assert metadata["ss_optimizer"] == "torch.optim.adamw.AdamW"  # no "()" without optimizer_args
    assert (metadata["ss_loss_type"], metadata["ss_huber_c"], metadata["ss_multires_noise_discount"]) == (
        "l2", "0.1", "0.3")
    assert metadata["ss_sd_scripts_commit_hash"] == "(unknown)"
    # A diffusers folder cannot be hashed as a file: sd-scripts writes "IsADirectory"; only its base name is kept.
    assert (metadata["ss_sd_model_hash"], metadata["ss_new_sd_model_hash"]) == ("IsADirectory", "IsADirectory")
    assert metadata["ss_sd_model_name"] == "tiny-sd"
    assert int(metadata["ss_session_id"]) <= 2**32 and float(metadata["ss_training_started_at"]) > 0
    assert float(metadata["ss_training_finished_at"]) >= float(metadata["ss_training_started_at"])
    assert not any(str(config.output_dir) in value or "/tmp" in value or "\\" in value
                   for key, value in metadata.items() if key != "ss_datasets") and "/" not in metadata["ss_datasets"]


def test_ss_datasets_holds_each_dataset_and_subset_with_its_buckets(dataset_config_run):
    _, _, metadata = dataset_config_run
    (dataset,) = json.loads(metadata["ss_datasets"])
    assert set(dataset) == SD_SCRIPTS_DATASET_ENTRY_KEYS
    assert all(set(subset) == SD_SCRIPTS_SUBSET_ENTRY_KEYS for subset in dataset["subsets"])
    assert (dataset["is_dreambooth"], dataset["batch_size_per_device"], dataset["resolution"]) == (True, 2, [64, 64])
    assert (dataset["num_train_images"], dataset["num_reg_images"]) == (5, 3)
    assert (dataset["enable_bucket"], dataset["min_bucket_reso"], dataset["max_bucket_reso"]) == (True, 64, 128)
    assert [(s["image_dir"], s["img_count"], s["num_repeats"], s["is_reg"], s["class_tokens"])
            for s in dataset["subsets"]] == [("shapes", 2, 2, False, None), ("shapes", 1, 1, False, None),
                                             ("shapes", 3, 1, True, "Shape")]
    assert dataset["tag_frequency"] == json.loads(metadata["ss_tag_frequency"])
    # One bucket, 64x64, holding all 10 images with repeats; the 80x64 image's aspect error 0.25 over 6 images.
    assert dataset["bucket_info"]["buckets"] == {"0": {"resolution": [64, 64], "count": 10}}
    assert dataset["bucket_info"]["mean_img_ar_error"] == pytest.approx(0.25 / 6)


def test_modelspec_keys_are_sd_scripts_lora_spec(dataset_config_run):
    _, _, metadata = dataset_config_run
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.implementation"] == "diffusers"
    assert (metadata["modelspec.title"], metadata["modelspec.prediction_type"]) == ("meta", "epsilon")
    assert metadata["modelspec.resolution"] == "512x512"  # config_file has no resolution: sd-scripts' default
    assert metadata["modelspec.encoder_layer"] == "2"
    assert metadata["modelspec.implementation_version"].startswith("lycolab/")
    datetime.datetime.fromisoformat(metadata["modelspec.date"])


def test_train_data_dir_run_writes_sd_scripts_flat_keys(tiny_model_dir, tmp_path):
    train_dir = tmp_path / "train"
    _images(train_dir / "2_shapes", 3)
    _images(tmp_path / "reg" / "1_shapes", 2, captions=False)
    config = load_config(overrides=_overrides(
        tiny_model_dir, tmp_path, train_data_dir=str(train_dir), reg_data_dir=str(tmp_path / "reg"),
        resolution="64", caption_extension=".txt", train_batch_size=4, gradient_accumulation_steps=2))
    result = train(config, progress=False)
    metadata = _metadata(result.saved_files[-1])
    expected = (SD_SCRIPTS_RUN_KEYS | SD_SCRIPTS_TRAIN_DATA_DIR_KEYS | SD_SCRIPTS_MODEL_KEYS | SD_SCRIPTS_SAVE_KEYS
                | SD_SCRIPTS_MODELSPEC_KEYS)  # no network_args, no clip_skip
    assert set(metadata) == expected, (set(metadata) - expected, expected - set(metadata))
    # 6 training images with repeats, 2 reg images balanced to 6: 12 per epoch, batch 4, 2 batches a step.
    assert (metadata["ss_max_train_steps"], metadata["ss_num_batches_per_epoch"]) == ("2", "3")
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"]) == ("6", "2")
    assert json.loads(metadata["ss_dataset_dirs"]) == {"2_shapes": {"n_repeats": 2, "img_count": 3}}
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"1_shapes": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(metadata["ss_tag_frequency"])["1_shapes"] == {"shapes": 2}  # class tokens from the name
    assert (metadata["ss_batch_size_per_device"], metadata["ss_total_batch_size"]) == ("4", "8")
    assert (metadata["ss_resolution"], metadata["ss_enable_bucket"], metadata["ss_bucket_info"]) == (
        "(64, 64)", "False", "null")
    assert (metadata["ss_min_bucket_reso"], metadata["ss_max_bucket_reso"], metadata["ss_bucket_no_upscale"]) == (
        "None", "None", "False")
    assert (metadata["ss_shuffle_caption"], metadata["ss_keep_tokens"], metadata["ss_flip_aug"]) == (
        "False", "0", "False")
    assert metadata["modelspec.resolution"] == "64x64" and metadata["modelspec.title"] == "meta"


def test_no_metadata_keeps_sd_scripts_minimum_keys_and_the_model_spec():
    config = TrainConfig(no_metadata=True, output_name=None, v2=True, v_parameterization=True)
    run = {"ss_v2": "True", "ss_base_model_version": "sd_v2_v", "ss_network_module": "networks.lora",
           "ss_network_dim": "8", "ss_network_alpha": "4", "ss_seed": "3", "ss_tag_frequency": "{}"}
    saved = save_metadata(config, run, epoch=2, step=10, finished_at=1_700_000_000.5)
    assert set(saved) - SD_SCRIPTS_MODELSPEC_KEYS == set(MINIMUM_KEYS) - {"ss_network_args"}
    assert saved["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert (saved["modelspec.resolution"], saved["modelspec.prediction_type"]) == ("768x768", "v")
    assert saved["modelspec.title"] == "LoRA@1700000000.5"  # no output_name: sd-scripts' "LoRA@<timestamp>"
    full = save_metadata(TrainConfig(), run, epoch=2, step=10, finished_at=1.0)
    assert (full["ss_epoch"], full["ss_steps"], full["ss_training_finished_at"]) == ("2", "10", "1.0")


def test_model_spec_names_sd2_and_timestep_range():
    spec = model_spec(TrainConfig(v2=True, output_name="x", resolution="512,768"), 0.0)
    assert spec["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert spec["modelspec.resolution"] == "512x768" and "modelspec.encoder_layer" not in spec
    if hasattr(TrainConfig(), "min_timestep"):
        ranged = model_spec(TrainConfig(min_timestep=100), 0.0)
        assert ranged["modelspec.timestep_range"] == "100,1000"


def test_checkpoint_files_get_a1111s_hashes_and_only_their_base_name(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    data = bytes(range(256)) * (5 * 4096 + 7)  # over 1 MiB + 64 KiB, as a real checkpoint
    checkpoint.write_bytes(data)
    assert legacy_model_hash(str(checkpoint)) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert file_sha256(str(checkpoint)) == hashlib.sha256(data).hexdigest()
    assert model_keys(str(checkpoint), "vae") == {"ss_vae_hash": legacy_model_hash(str(checkpoint)),
                                                  "ss_new_vae_hash": hashlib.sha256(data).hexdigest(),
                                                  "ss_vae_name": "model.safetensors"}
    assert model_keys("runwayml/stable-diffusion-v1-5", "sd_model") == {
        "ss_sd_model_name": "runwayml/stable-diffusion-v1-5"}  # a hub id, not on disk: no hash, as given
    assert model_keys(str(tmp_path / "gone.ckpt"), "sd_model") == {"ss_sd_model_name": "gone.ckpt"}
    assert legacy_model_hash(str(tmp_path)) == "IsADirectory" and file_sha256(str(tmp_path / "no")) == "NOFILE"


def test_adafactor_with_relative_step_is_recorded_as_sd_scripts_records_it():
    from transformers.optimization import Adafactor

    config = TrainConfig(optimizer_type="AdaFactor", learning_rate=1e-4, optimizer_args=["scale_parameter=False"])
    choice = SimpleNamespace(optimizer=Adafactor([torch.zeros(1, requires_grad=True)]), forced_scheduler="adafactor")
    values = optimizer_metadata(config, choice)
    assert values["ss_optimizer"] == "transformers.optimization.Adafactor(scale_parameter=False,relative_step=True)"
    assert (values["ss_lr_scheduler"], values["ss_learning_rate"], values["ss_unet_lr"]) == (
        "adafactor:0.0001", "None", "None")
    adamw = SimpleNamespace(optimizer=torch.optim.AdamW([torch.zeros(1, requires_grad=True)]), forced_scheduler=None)
    plain = optimizer_metadata(TrainConfig(lr_scheduler="cosine", optimizer_args=["weight_decay=0.1"]), adamw)
    assert plain == {"ss_lr_scheduler": "cosine", "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.1)"}
    given = SimpleNamespace(optimizer=None, forced_scheduler=None, ss_optimizer="torch.optim.sgd.SGD(momentum=0.9)")
    assert optimizer_metadata(TrainConfig(), given)["ss_optimizer"] == "torch.optim.sgd.SGD(momentum=0.9)"
