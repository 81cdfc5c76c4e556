"""Every config key given values of every type, from Python, from real TOML files and from the command line.

The invariant (issue 13): a value either gives a config whose every field holds its declared type — so the code that
runs next (bucketing, the run plan, metadata, seeding) works on it — or a one-line ConfigError naming the key, and
the file when the value came from one. Never a TypeError/AttributeError/KeyError from later code.
"""

from __future__ import annotations

import logging
import math
import types
import typing
from pathlib import Path

import pytest
import tomli_w
from conftest import write_images
from hypothesis import assume, given
from hypothesis import strategies as st

from lycolab.config import (
    DATASET_KEYS,
    SUBSET_KEYS,
    TRAIN_KEYS,
    ConfigError,
    DatasetConfig,
    SubsetConfig,
    TrainConfig,
    load_config,
    network_args_dict,
)

ALL_KEYS = tuple(dict.fromkeys(TRAIN_KEYS + DATASET_KEYS + SUBSET_KEYS))
LEVEL_KEYS = DATASET_KEYS + SUBSET_KEYS
FOLDER_KEYS = ("train_data_dir", "reg_data_dir", "image_dir", "dataset_config")
MAX_MESSAGE = 600  # one line that a person reads: values are shown cut short, paths in full

# The values TOML can hold, with the edges that matter for training options: 0, negatives, 64-bit limits, NaN/inf.
EDGE_NUMBERS = [0, -1, 1, 7, 8, 64, 100, 2**31, 2**32, 2**63 - 1, -(2**63), 0.5, -0.0, 1e308, 1e-320,
                math.nan, math.inf, -math.inf]
EDGE_TEXTS = ["", " ", "512,768", "64", "algo=loha", "conv_dim=inf", ".txt", "txt", "a/b", ".", "fp16", "bf16",
              "lycoris.kohya", "adafactor", "polynomial", "\n", "é", "\x00", "x" * 300]
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.sampled_from(EDGE_NUMBERS),
    st.text(max_size=10),
    st.sampled_from(EDGE_TEXTS),
    st.dates(),
)
toml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=2), max_leaves=5)
# From Python (a notebook form, or code calling load_config) anything goes, including what TOML cannot hold.
python_values = st.one_of(toml_values, st.none(), st.integers(min_value=2**63, max_value=2**4000),
                          st.integers(max_value=-(2**63) - 1, min_value=-(2**4000)), st.just("x" * 1_000_000),
                          st.tuples(st.integers(), st.integers()))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with two tiny captioned images in ``train/2_x``; tests run from a folder below it, so relative paths
    that hypothesis writes ("", ".", "x") never reach beyond this workspace."""
    root = tmp_path_factory.mktemp("fuzz_config")
    write_images(root / "train" / "2_x", [(64, 64), (80, 48)], ["a, b"], extension=".txt")
    (root / "cwd").mkdir()
    return root


@pytest.fixture(autouse=True)
def _inside_workspace(workspace, monkeypatch):
    monkeypatch.chdir(workspace / "cwd")
    package_logger = logging.getLogger("lycolab")
    level = package_logger.level
    package_logger.setLevel(logging.ERROR)  # unknown-key warnings are tested on their own
    yield
    package_logger.setLevel(level)


def _base(workspace: Path) -> dict[str, typing.Any]:
    """A valid small config: bucketing on, so every bucket key is exercised."""
    return {"train_data_dir": str(workspace / "train"), "output_dir": str(workspace / "out"), "resolution": "64",
            "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 8,
            "caption_extension": ".txt"}


def _inside(key: str, value: typing.Any) -> bool:
    """Folder values stay inside the workspace: an absolute path or ``..`` could make a scan walk the whole disk."""
    return not (key in FOLDER_KEYS and isinstance(value, str) and (value.startswith(("/", "~")) or ".." in value))


def _conforms(value: typing.Any, annotation: typing.Any) -> bool:
    """Whether a field holds exactly its declared type (bool is not int, floats are finite, sizes are int pairs)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(type(item) is str and "\x00" not in item for item in value)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == 2 and all(type(item) is int for item in value)
    if annotation is float:
        return type(value) is float and math.isfinite(value)
    if annotation is str:
        return type(value) is str and "\x00" not in value
    return type(value) is annotation


def _assert_typed(instance: typing.Any) -> None:
    hints = typing.get_type_hints(type(instance))
    for name, annotation in hints.items():
        if name not in ("datasets", "subsets"):
            assert _conforms(getattr(instance, name), annotation), (name, getattr(instance, name))


def _assert_usable(config: TrainConfig) -> None:
    """The accepted config is typed all through, and what training does with it before loading a model works."""
    from accelerate.utils import set_seed

    from lycolab.data.dataset import BucketedDataset
    from lycolab.networks.args import network_kwargs
    from lycolab.training.loop import plan_run
    from lycolab.training.metadata import training_metadata

    _assert_typed(config)
    assert config.datasets and all(isinstance(dataset, DatasetConfig) for dataset in config.datasets)
    for dataset in config.datasets:
        _assert_typed(dataset)
        assert dataset.subsets and all(isinstance(subset, SubsetConfig) for subset in dataset.subsets)
        for subset in dataset.subsets:
            _assert_typed(subset)
    dataset = BucketedDataset(config.datasets, config.train_batch_size, seed=config.seed or 0)
    if len(dataset):  # training stops with "no usable images" before planning an empty set
        plan = plan_run(config, dataset)
        assert plan.total_steps >= 1 and plan.epochs >= 1
        training_metadata(config, dataset)
    if config.seed is not None:
        set_seed(config.seed)
    network_kwargs(config.network_module, config.network_dim, config.network_alpha,
                   network_args_dict(config), config.network_dropout)


def _assert_names(error: ConfigError, key: str, file: Path | None = None) -> None:
    message = str(error)
    assert "\n" not in message and len(message) <= MAX_MESSAGE, message[:2000]
    assert key in message, message
    if file is not None:
        assert file.name in message, message


def _accepted_or_named(key: str, file: Path | None = None, **load) -> None:
    try:
        config = load_config(**load)
    except ConfigError as error:
        _assert_names(error, key, file)
    else:
        _assert_usable(config)


@given(key=st.sampled_from(ALL_KEYS), value=python_values)
def test_any_value_for_any_key_as_an_override_is_used_or_named(workspace, key, value):
    assume(_inside(key, value))
    _accepted_or_named(key, overrides={**_base(workspace), key: value})


@given(key=st.sampled_from(TRAIN_KEYS), value=toml_values, section=st.sampled_from(["training_arguments", "x"]))
def test_any_value_for_any_key_in_config_file_toml_is_used_or_named_with_the_file(workspace, tmp_path_factory, key,
                                                                                 value, section):
    assume(_inside(key, value))
    path = tmp_path_factory.mktemp("c") / "config_file.toml"
    path.write_text(tomli_w.dumps({"dataset_arguments": _base(workspace), section: {key: value}}), encoding="utf-8")
    _accepted_or_named(key, path, config_file=path)


def _dataset_document(workspace: Path) -> dict[str, typing.Any]:
    return {"general": {"resolution": 64, "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 128,
                        "bucket_reso_steps": 8, "caption_extension": ".txt"},
            "datasets": [{"subsets": [{"image_dir": str(workspace / "train" / "2_x")}]}]}


@given(key=st.sampled_from(LEVEL_KEYS), value=toml_values, level=st.sampled_from(["general", "dataset", "subset"]))
def test_any_value_for_any_key_in_dataset_config_toml_is_used_or_named_with_the_file(workspace, tmp_path_factory,
                                                                                    key, value, level):
    assume(_inside(key, value))
    document = _dataset_document(workspace)
    table = {"general": document["general"], "dataset": document["datasets"][0],
             "subset": document["datasets"][0]["subsets"][0]}[level]
    table[key] = value
    path = tmp_path_factory.mktemp("d") / "dataset_config.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    _accepted_or_named(key, path, dataset_config=path, overrides={"output_dir": str(workspace / "out")})


command_line_words = st.one_of(st.sampled_from(EDGE_TEXTS[:-1] + ["true", "1e400", "[1, 2]", "{a = 1}", "nan",
                                                                  "-inf", "0x10", "1979-05-27", '"quoted"']),
                               st.text(max_size=8)).filter(lambda word: not word.startswith("--"))


@given(key=st.sampled_from(TRAIN_KEYS), words=st.lists(command_line_words, max_size=3))
def test_any_command_line_value_for_any_key_is_used_or_named(workspace, tmp_path_factory, key, words):
    """``lycolab train --config_file F --key word …``: the words are read as TOML literals (lycolab.cli)."""
    from lycolab.cli import parse_overrides

    overrides = parse_overrides([f"--{key}", *words])
    assume(_inside(key, overrides[key]))
    path = tmp_path_factory.mktemp("c") / "config_file.toml"
    path.write_text(tomli_w.dumps({"dataset_arguments": _base(workspace)}), encoding="utf-8")
    _accepted_or_named(key, config_file=path, overrides=overrides)


# --------------------------------------------------------------------------------------- dataset_config's shapes

shape_values = st.one_of(toml_values, st.lists(toml_values, max_size=2), st.just({}), st.just([]))


@given(general=st.one_of(st.none(), shape_values), datasets=st.one_of(st.none(), shape_values, st.lists(
    st.one_of(shape_values, st.fixed_dictionaries({"subsets": shape_values})), min_size=1, max_size=2)))
def test_dataset_config_tables_of_any_shape_are_used_or_named_with_the_file(workspace, tmp_path_factory, general,
                                                                           datasets):
    document = {key: value for key, value in (("general", general), ("datasets", datasets)) if value is not None}
    path = tmp_path_factory.mktemp("d") / "dataset_config.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    try:
        config = load_config(dataset_config=path, overrides={"output_dir": str(workspace / "out")})
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message and len(message) <= MAX_MESSAGE and path.name in message, message
    else:  # only a document with [[datasets]] holding [[datasets.subsets]] with image_dir can be accepted
        assert isinstance(datasets, list) and config.datasets
        _assert_usable(config)


@given(name=st.text(min_size=1, max_size=20), value=toml_values,
       level=st.sampled_from(["top", "general", "dataset", "subset", "config_file"]))
def test_unknown_keys_anywhere_stop_in_one_line_or_with_allow_unknown_keys_warn_once(
        workspace, tmp_path_factory, caplog, name, value, level):
    from lycolab.config import ALIASES
    from lycolab.unsupported import REFUSED_OPTIONS

    assume(name not in ALL_KEYS + ("general", "datasets", "subsets", "dataset_arguments") + tuple(REFUSED_OPTIONS)
           + tuple(ALIASES))
    folder = tmp_path_factory.mktemp("u")
    document = _dataset_document(workspace)
    tables = {"top": document, "general": document["general"], "dataset": document["datasets"][0],
              "subset": document["datasets"][0]["subsets"][0]}
    config_document = {"a": {"output_dir": str(workspace / "out"), "dataset_config": str(folder / "d.toml")}}
    tables.get(level, config_document["a"])[name] = value
    (folder / "d.toml").write_text(tomli_w.dumps(document), encoding="utf-8")
    (folder / "c.toml").write_text(tomli_w.dumps(config_document), encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_config(folder / "c.toml")
    assert "unknown key" in str(error.value) and "\n" not in str(error.value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lycolab.config"):
        load_config(folder / "c.toml", overrides={"allow_unknown_keys": True})
    warnings = [record.getMessage() for record in caplog.records if "unknown keys" in record.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings


@pytest.mark.parametrize(("words", "expected"), [
    (["--seed", "-5"], "seed must be between 0 and 4294967295"),
    (["--network_dim", "8", "16"], "network_dim must be an integer, got [8, 16] (list)"),
    (["--learning_rate", "nan"], "learning_rate must be a finite number, got nan (float)"),
    (["--resolution", "512x512"], "resolution must be a size like 512"),
])
def test_the_train_command_prints_one_line_naming_the_key(workspace, tmp_path, capsys, words, expected):
    from lycolab.cli import main

    path = tmp_path / "config_file.toml"
    path.write_text(tomli_w.dumps({"dataset_arguments": _base(workspace)}), encoding="utf-8")
    assert main(["train", "--config_file", str(path), *words]) != 0
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and expected in errors[0], errors
