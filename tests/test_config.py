import dataclasses
import logging
import re

import pytest
import tomli_w
from conftest import write_images

from lycolab.config import (
    ConfigError,
    DatasetConfig,
    SubsetConfig,
    TrainConfig,
    flatten_config_sections,
    load_config,
    read_config_file,
    read_dataset_config,
    write_config_file,
    write_dataset_config,
)

OLD_NOTEBOOK_CONFIG = {
    "model_arguments": {
        "v2": False, "v_parameterization": False, "pretrained_model_name_or_path": "/m/anything.safetensors",
    },
    "additional_network_arguments": {
        "no_metadata": False, "unet_lr": 1e-4, "text_encoder_lr": 5e-5, "network_module": "lycoris.kohya",
        "network_dim": 32, "network_alpha": 16, "network_args": ["algo=loha", "conv_dim=8", "conv_alpha=4"],
        "network_train_unet_only": False, "network_train_text_encoder_only": False,
    },
    "optimizer_arguments": {"optimizer_type": "AdamW8bit", "learning_rate": 1e-4, "max_grad_norm": 1.0,
                            "lr_scheduler": "constant", "lr_warmup_steps": 0},
    "dataset_arguments": {"cache_latents": True, "debug_dataset": False, "vae_batch_size": 4},
    "training_arguments": {
        "output_dir": "/content/LoRA/output", "output_name": "holo", "save_precision": "fp16",
        "save_every_n_epochs": 1, "train_batch_size": 6, "max_token_length": 225, "mem_eff_attn": False,
        "xformers": True, "max_train_epochs": 10, "max_data_loader_n_workers": 8,
        "persistent_data_loader_workers": True, "seed": 31337, "gradient_checkpointing": False,
        "gradient_accumulation_steps": 1, "mixed_precision": "fp16", "clip_skip": 2,
        "logging_dir": "/content/LoRA/logs", "log_prefix": "holo", "lowram": True,
    },
    "sample_prompt_arguments": {"sample_every_n_epochs": 1, "sample_sampler": "euler_a"},
    "dreambooth_arguments": {"prior_loss_weight": 1.0},
    "saving_arguments": {"save_model_as": "safetensors"},
}


def _write_toml(path, document):
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


def test_sections_are_flattened_like_sd_scripts():
    flat = flatten_config_sections({"a": {"x": 1}, "b": {"y": 2}, "top": 3})
    assert flat == {"x": 1, "y": 2, "top": 3}


def test_old_notebook_config_file_reads_into_typed_config(tmp_path):
    config = read_config_file(_write_toml(tmp_path / "config_file.toml", OLD_NOTEBOOK_CONFIG))
    assert config.network_dim == 32 and isinstance(config.network_alpha, float) and config.network_alpha == 16.0
    assert config.network_args == ["algo=loha", "conv_dim=8", "conv_alpha=4"]
    assert config.max_token_length == 225 and config.clip_skip == 2 and config.train_batch_size == 6
    assert config.sample_sampler == "euler_a" and config.mixed_precision == "fp16"


def test_config_file_round_trip_is_equal(tmp_path):
    first = read_config_file(_write_toml(tmp_path / "in.toml", OLD_NOTEBOOK_CONFIG))
    second = read_config_file(write_config_file(first, tmp_path / "out.toml"))
    assert first == second
    assert "[additional_network_arguments]" in (tmp_path / "out.toml").read_text()


def test_dataset_config_round_trip_is_equal(tmp_path):
    write_images(tmp_path / "a", [(64, 64)])
    write_images(tmp_path / "b", [(64, 64)])
    datasets = [
        DatasetConfig(
            subsets=[SubsetConfig(image_dir=str(tmp_path / "a"), num_repeats=10, class_tokens="sks girl",
                                  caption_extension=".txt", shuffle_caption=True, keep_tokens=1),
                     SubsetConfig(image_dir=str(tmp_path / "b"), num_repeats=2, is_reg=True,
                                  caption_extension=".txt", shuffle_caption=True, keep_tokens=1)],
            resolution=(512, 768), enable_bucket=True, min_bucket_reso=256, max_bucket_reso=1024,
        )
    ]
    path = write_dataset_config(datasets, tmp_path / "dataset_config.toml")
    assert read_dataset_config(path) == datasets
    text = path.read_text()
    assert "[general]" in text and "[[datasets.subsets]]" in text
    assert read_dataset_config(write_dataset_config(read_dataset_config(path), tmp_path / "again.toml")) == datasets


def test_general_values_cascade_into_datasets_and_subsets(tmp_path):
    write_images(tmp_path / "imgs", [(64, 64)])
    path = _write_toml(tmp_path / "d.toml", {
        "general": {"shuffle_caption": True, "caption_extension": ".txt", "keep_tokens": 2, "resolution": 768},
        "datasets": [{"batch_size": 3, "keep_tokens": 1, "subsets": [{"image_dir": str(tmp_path / "imgs"),
                                                                        "num_repeats": 4}]}],
    })
    [dataset] = read_dataset_config(path)
    assert dataset.resolution == (768, 768) and dataset.batch_size == 3
    [subset] = dataset.subsets
    assert subset.shuffle_caption and subset.caption_extension == ".txt" and subset.keep_tokens == 1


def test_unknown_keys_stop_with_one_line_unless_allow_unknown_keys_only_warns(tmp_path, caplog):
    document = {"training_arguments": {"output_dir": "o", "frobnicate": 1, "learning_rat": 1e-4}}
    path = _write_toml(tmp_path / "c.toml", document)
    with pytest.raises(ConfigError) as error:
        load_config(path, _dataset_file(tmp_path))
    assert str(error.value).startswith(f"{path}: unknown keys frobnicate, learning_rat (did you mean learning_rate?)")
    assert "\n" not in str(error.value)
    with caplog.at_level(logging.WARNING):
        load_config(path, _dataset_file(tmp_path), overrides={"allow_unknown_keys": True})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "frobnicate" in warnings[0] and "c.toml" in warnings[0]


def test_a_refused_sd_scripts_key_is_named_with_why_and_its_off_value_is_accepted(tmp_path):
    off = {"training_arguments": {"output_dir": "o", "fp8_base": False, "deepspeed": False, "zero_stage": 2,
                                  "caption_extention": ".txt"}}
    config = load_config(_write_toml(tmp_path / "off.toml", off), _dataset_file(tmp_path))
    assert config.caption_extension == ".txt"  # sd-scripts' misspelt alias
    on = {"training_arguments": {"output_dir": "o", "fp8_base": True}}
    with pytest.raises(ConfigError, match="fp8_base is not supported by lycolab: fp8 weights need a recent GPU"):
        load_config(_write_toml(tmp_path / "on.toml", on), _dataset_file(tmp_path))
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.alpha_mask is not supported by lycolab"):
        path = _write_toml(tmp_path / "d.toml", {"datasets": [{"alpha_mask": True, "subsets": [
            {"image_dir": str(tmp_path / "imgs")}]}]})
        load_config(_write_toml(tmp_path / "c.toml", {"training_arguments": {"output_dir": "o"}}), path)


def test_config_file_dataset_keys_are_the_fallback_of_a_dataset_config(tmp_path):
    """sd-scripts: config_file's dataset arguments apply wherever dataset_config.toml does not set the key."""
    document = {"dataset_arguments": {"shuffle_caption": True, "keep_tokens": 2, "caption_extension": ".txt",
                                      "resolution": "640", "enable_bucket": True, "flip_aug": True},
                "training_arguments": {"output_dir": "o"}}
    dataset = {"general": {"keep_tokens": 1}, "datasets": [{"subsets": [{"image_dir": str(tmp_path / "imgs")}]}]}
    write_images(tmp_path / "imgs", [(64, 64)])
    config = load_config(_write_toml(tmp_path / "c.toml", document), _write_toml(tmp_path / "d.toml", dataset))
    [loaded] = config.datasets
    [subset] = loaded.subsets
    assert (subset.shuffle_caption, subset.keep_tokens, subset.caption_extension, subset.flip_aug) == (
        True, 1, ".txt", True)  # [general] wins over config_file, config_file over the defaults
    assert loaded.resolution == (640, 640) and loaded.enable_bucket


def test_save_model_as_ckpt_writes_safetensors_and_says_so(tmp_path, caplog):
    document = {"saving_arguments": {"save_model_as": "ckpt"}, "training_arguments": {"output_dir": "o"}}
    with caplog.at_level(logging.WARNING):
        config = load_config(_write_toml(tmp_path / "c.toml", document), _dataset_file(tmp_path))
    assert config.save_model_as == "safetensors" and "writing .safetensors instead" in caplog.text


def _dataset_file(tmp_path):
    write_images(tmp_path / "imgs", [(64, 64)])
    document = {"datasets": [{"subsets": [{"image_dir": str(tmp_path / "imgs")}]}]}
    return _write_toml(tmp_path / "dataset_config.toml", document)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"network_dim": 0}, "network_dim must be at least 1"),
        ({"learning_rate": -1e-4}, "learning_rate must be >= 0"),
        ({"unet_lr": -0.5}, "unet_lr must be >= 0"),
        ({"network_dim": "eight"}, "network_dim must be an integer"),
        ({"train_batch_size": 1.5}, "train_batch_size must be an integer"),
        ({"v2": "yes"}, "v2 must be true/false"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"max_token_length": 100}, "max_token_length must be 75, 150 or 225"),
        ({"network_args": ["algo=lorax"]}, "algo must be one of"),
        ({"network_args": ["conv_dim"]}, "must look like"),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "decompose_both=maybe"]},
         "decompose_both must be true or false"),
        ({"network_args": ["rank_dropout=1.5"]}, "rank_dropout must be in [0, 1)"),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=x"]}, "factor must be a number"),
        ({"network_module": "lycoris.kohya", "network_args": ["preset=attn-onyl"]},
         "preset 'attn-onyl' is neither a LyCORIS preset"),
        ({"network_args": ["block_dims=2,2,2"]}, "block_dims must have 25 (SD 1.x/2.x) or 23 (SDXL) numbers"),
        ({"network_args": ["down_lr_weight=0.5"]}, "down_lr_weight must be comma-separated numbers"),
        ({"network_args": ["loraplus_lr_ratio=fast"]}, "loraplus_lr_ratio must be a number"),
        ({"network_module": "lycoris.kohya", "network_args": ["train_norm=maybe"]}, "train_norm must be true or"),
        ({"network_args": ["train_block_indices=0-3"]}, "train_block_indices: not supported by lycolab yet"),
    ],
)
def test_bad_config_value_names_key_and_file(tmp_path, overrides, expected):
    config_path = _write_toml(tmp_path / "config_file.toml", {"training_arguments": {"output_dir": "o", **overrides}})
    with pytest.raises(ConfigError) as error:
        load_config(config_path, _dataset_file(tmp_path))
    message = str(error.value)
    assert expected in message and "config_file.toml" in message
    assert "\n" not in message


def test_missing_image_dir_is_named_with_the_dataset_file(tmp_path):
    config_path = _write_toml(tmp_path / "config_file.toml", {"a": {"output_dir": "o"}})
    dataset_path = _write_toml(tmp_path / "dataset_config.toml",
                               {"datasets": [{"subsets": [{"image_dir": str(tmp_path / "nowhere")}]}]})
    with pytest.raises(ConfigError, match=r"dataset_config\.toml: image_dir .*nowhere does not exist"):
        load_config(config_path, dataset_path)


def test_subset_without_image_dir_is_an_error(tmp_path):
    path = _write_toml(tmp_path / "dataset_config.toml", {"datasets": [{"subsets": [{"num_repeats": 3}]}]})
    with pytest.raises(ConfigError, match="has no image_dir"):
        read_dataset_config(path)


def test_wrong_type_in_dataset_config_names_key(tmp_path):
    write_images(tmp_path / "imgs", [(64, 64)])
    path = _write_toml(tmp_path / "dataset_config.toml",
                       {"datasets": [{"subsets": [{"image_dir": str(tmp_path / "imgs"), "num_repeats": "ten"}]}]})
    expected = r"dataset_config\.toml: datasets\[0\]\.subsets\[0\]\.num_repeats must be an integer"
    with pytest.raises(ConfigError, match=expected):
        read_dataset_config(path)


def test_overrides_win_over_toml_values(tmp_path):
    config_path = _write_toml(tmp_path / "config_file.toml", {"x": {"learning_rate": 1e-4, "output_dir": "o"}})
    config = load_config(config_path, _dataset_file(tmp_path), {"learning_rate": 3e-4})
    assert config.learning_rate == 3e-4


def test_train_data_dir_without_dataset_config_uses_folder_repeats(tmp_path):
    write_images(tmp_path / "train" / "10_sks dog", [(64, 64)] * 2)
    write_images(tmp_path / "train" / "3_other", [(64, 64)])
    config = load_config(overrides={"train_data_dir": str(tmp_path / "train"), "resolution": "512,768",
                                    "caption_extension": ".txt", "output_dir": "o"})
    [dataset] = config.datasets
    assert dataset.resolution == (512, 768)
    assert sorted((s.num_repeats, s.class_tokens) for s in dataset.subsets) == [(3, "other"), (10, "sks dog")]


def test_every_train_key_has_a_section_for_writing():
    from lycolab.config import CONFIG_SECTIONS, TRAIN_KEYS

    written = {key for keys in CONFIG_SECTIONS.values() for key in keys}
    assert set(TRAIN_KEYS) == written
    assert [f.name for f in dataclasses.fields(TrainConfig)][-1] == "datasets"


def test_network_args_become_create_network_arguments():
    from lycolab.networks.args import network_kwargs

    kwargs = network_kwargs("lycoris.kohya", 16, 8.0, {
        "algo": "LoKr", "conv_dim": "8", "conv_alpha": "4", "factor": "8", "decompose_both": "False",
        "use_conv_cp": "True", "rank_dropout": "0.1", "module_dropout": "0.05"}, network_dropout=0.2)
    assert kwargs == {"algo": "lokr", "dim": 16, "alpha": 8.0, "network_module": "lycoris.kohya", "conv_dim": 8,
                      "conv_alpha": 4.0, "rank_dropout": 0.1, "module_dropout": 0.05, "dropout": 0.2, "factor": 8,
                      "decompose_both": False, "use_tucker": True}
    # sd-scripts' networks.lora makes LoRA/LoCon only, whatever algo says
    assert network_kwargs("networks.lora", None, 1.0, {"conv_dim": "4"})["algo"] == "lora"


def test_unknown_network_args_get_one_warning(tmp_path, caplog):
    config_path = _write_toml(tmp_path / "config_file.toml", {"a": {
        "output_dir": "o", "network_module": "networks.lora", "network_args": ["conv_dim=4", "factor=4", "lr_x=1"]}})
    load_config(config_path, _dataset_file(tmp_path))
    warnings = [record.getMessage() for record in caplog.records if "network_args" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith("network_args not used by networks.lora: factor, lr_x")


# ----------------------------------------------------------------- issue 13: values that used to crash or hang

def _train_dir(tmp_path):
    write_images(tmp_path / "train" / "2_x", [(64, 64)], ["a"], extension=".txt")
    return {"train_data_dir": str(tmp_path / "train"), "output_dir": "o", "resolution": "64",
            "caption_extension": ".txt"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"learning_rate": 10**400}, "learning_rate must be a finite number"),  # was OverflowError
        ({"network_alpha": float("nan")}, "network_alpha must be a finite number"),
        ({"unet_lr": float("inf")}, "unet_lr must be a finite number"),
        ({"network_dim": 2**64}, "network_dim must be an integer.*TOML integers are 64-bit"),
        ({"train_data_dir": "nowhere"}, "train_data_dir nowhere is not a folder"),  # was FileNotFoundError
        ({"reg_data_dir": "nowhere"}, "reg_data_dir nowhere is not a folder"),
        ({"resolution": "abc"}, "resolution must be a size like 512"),  # was TypeError
        ({"resolution": "²"}, "resolution must be a size like 512"),  # isdigit() but not int()-able
        ({"resolution": "100000"}, "resolution must be between 64 and 8192"),
        ({"caption_extension": ""}, "caption_extension must be a file extension"),  # was ValueError from pathlib
        ({"caption_extension": "a/b"}, "caption_extension must be a file extension"),
        ({"enable_bucket": True, "max_bucket_reso": 10**12}, "max_bucket_reso"),  # was an endless bucket loop
        ({"enable_bucket": True, "min_bucket_reso": 256}, "resolution 64x64 must lie within min_bucket_reso"),
        ({"seed": 2**32}, "seed must be between 0 and 4294967295"),  # accelerate's set_seed raised mid-setup
        ({"seed": -1}, "seed must be between 0 and 4294967295"),
        ({"network_args": ["conv_dim=inf"]}, "network_args conv_dim must be a finite number"),  # was OverflowError
        ({"network_dropout": 1.5}, "network_dropout must be in"),
        ({"lr_scheduler_power": -1}, "lr_scheduler_power must be >= 0"),  # polynomial decay divides by zero
        ({"prior_loss_weight": -1}, "prior_loss_weight must be >= 0"),
        ({"output_dir": "a\x00b"}, "output_dir must be a string"),  # no path can hold NUL
        ({"network_args": [True]}, "network_args must be a list of strings"),
        ({"dataset_config": "nowhere.toml"}, "dataset_config nowhere.toml not found"),
        ({"sample_sampler": "k_euler_b"}, "sample_sampler 'k_euler_b' is not known"),  # was a crash after an epoch
    ],
)
def test_values_that_used_to_crash_are_one_line_errors_naming_the_key(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(overrides={**_train_dir(tmp_path), **overrides})
    message = str(error.value)
    assert re.search(expected, message), message
    assert "\n" not in message


def test_num_repeats_beyond_any_use_is_refused_before_an_epoch_list_is_built(tmp_path):
    write_images(tmp_path / "imgs", [(64, 64)])
    path = _write_toml(tmp_path / "dataset_config.toml", {"datasets": [{"subsets": [
        {"image_dir": str(tmp_path / "imgs"), "num_repeats": 10**9}]}]})
    with pytest.raises(ConfigError, match=r"dataset_config\.toml: num_repeats must be between 1 and 10000"):
        load_config(dataset_config=path)


def test_a_huge_value_gives_a_short_message(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(overrides={**_train_dir(tmp_path), "network_dim": "x" * 50_000_000})
    assert len(str(error.value)) < 200 and "network_dim must be an integer" in str(error.value)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"datasets": "x"}, r"datasets must be an array of tables written \[\[datasets\]\], got 'x'"),
        ({"datasets": {"subsets": []}}, "datasets must be an array of tables"),  # [datasets] instead of [[datasets]]
        ({"datasets": [1]}, r"datasets\[0\] must be a table"),
        ({"datasets": [{"subsets": {"image_dir": "x"}}]}, r"datasets\[0\]\.subsets must be an array of tables "
                                                          r"written \[\[datasets\.subsets\]\]"),
        ({"datasets": [{"subsets": ["x"]}]}, r"datasets\[0\]\.subsets\[0\] must be a table"),
        ({"general": 3, "datasets": []}, r"general must be a table written \[general\]"),
        ({"general": {"resolution": [1, 2, 3]}, "datasets": []}, "general.resolution must be a size"),
        ({"datasets": [{"batch_size": "2", "subsets": [{"image_dir": "x"}]}]}, r"datasets\[0\]\.batch_size must be"),
    ],
)
def test_dataset_config_tables_of_the_wrong_shape_name_the_place_and_the_file(tmp_path, document, expected):
    path = _write_toml(tmp_path / "dataset_config.toml", document)  # these used to raise AttributeError
    with pytest.raises(ConfigError, match="dataset_config.toml: " + expected):
        read_dataset_config(path)


def test_a_config_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "config_file.toml"
    path.write_bytes(b"a = \xff\xfe\n")
    with pytest.raises(ConfigError, match="config_file.toml: not a text file"):
        load_config(path)


def test_misspelled_keys_are_named_with_the_key_they_probably_meant(tmp_path, caplog):
    write_images(tmp_path / "imgs", [(64, 64)])
    dataset_path = _write_toml(tmp_path / "dataset_config.toml", {
        "general": {"learning_rate": 1e-4, "resolutoin": 512},
        "datasets": [{"subsets": [{"image_dir": str(tmp_path / "imgs"), "num_repeat": 3}]}]})
    config_path = _write_toml(tmp_path / "config_file.toml", {"a": {"output_dir": "o", "netwrok_dim": 8,
                                                                     "num_repeats": 2}})
    with pytest.raises(ConfigError, match="unknown keys netwrok_dim \\(did you mean network_dim\\?\\)"):
        load_config(config_path, dataset_path)
    with caplog.at_level(logging.WARNING):
        load_config(config_path, dataset_path, overrides={"allow_unknown_keys": True})
    warnings = " | ".join(record.getMessage() for record in caplog.records)
    assert "netwrok_dim (did you mean network_dim?)" in warnings
    assert "num_repeats (a dataset_config.toml key)" in warnings
    assert "general.resolutoin (did you mean resolution?)" in warnings
    assert "general.learning_rate (a config_file.toml key)" in warnings
    assert "datasets[0].subsets[0].num_repeat (did you mean num_repeats?)" in warnings


def test_integers_are_accepted_for_every_float_key_as_sd_scripts_does(tmp_path):
    float_keys = [f.name for f in dataclasses.fields(TrainConfig) if f.type in ("float", "float | None")]
    integers = {key: 0 if key == "network_dropout" else 1 for key in float_keys}  # a dropout of 1 drops everything
    config = load_config(overrides={**_train_dir(tmp_path), **integers})
    assert float_keys and all(type(getattr(config, key)) is float for key in float_keys)
