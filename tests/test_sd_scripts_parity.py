"""Every option of sd-scripts' train_network.py and every dataset_config key (tests/data/sd_scripts_keys.toml,
extracted from sd-scripts' own parsers by scripts/sd_scripts_keys.py) is implemented or refused by name; the parity
page says which; shared keys have sd-scripts' defaults; old notebook configs load."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import tomllib
from conftest import write_images

from lycolab.config import ConfigError, TrainConfig, load_config
from lycolab.unsupported import REFUSED_OPTIONS

ROOT = Path(__file__).resolve().parent.parent
KEYS = tomllib.loads((ROOT / "tests" / "data" / "sd_scripts_keys.toml").read_text(encoding="utf-8"))
sys.path.insert(0, str(ROOT / "scripts"))
import parity_table  # noqa: E402

# lycolab's defaults that differ from sd-scripts' on purpose, and why
DIFFERENT_DEFAULTS: dict[str, str] = {}


@pytest.mark.parametrize("section", ["config_file", "dataset_config"])
def test_every_sd_scripts_key_is_implemented_or_refused_by_name(section):
    sources = parity_table._sources()
    missing = [key for key in parity_table.keys()[section] if parity_table.status(key, section, sources) == "MISSING"]
    assert missing == []


def test_the_parity_page_is_generated_from_the_key_list():
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "parity_table.py"), "--check"],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout


def test_shared_keys_have_sd_scripts_defaults():
    ours = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    different = {key: (ours[key], default) for key, default in KEYS["config_file"]["defaults"].items()
                 if key in ours and key not in DIFFERENT_DEFAULTS and ours[key] != default}
    assert different == {}


def _dataset(tmp_path: Path) -> Path:
    write_images(tmp_path / "imgs", [(64, 64)])
    path = tmp_path / "dataset_config.toml"
    path.write_text(tomli_w.dumps({"datasets": [{"subsets": [{"image_dir": str(tmp_path / "imgs")}]}]}))
    return path


def _on_value(default):
    """A value that is not the refused key's "off" default."""
    if isinstance(default, bool) or default is None:
        return True
    if isinstance(default, str):
        return default + "x"
    return default + 1


@pytest.mark.parametrize("key", sorted(REFUSED_OPTIONS))
def test_a_refused_key_stops_in_one_line_naming_it_and_its_default_is_accepted(tmp_path, key):
    default, reason = REFUSED_OPTIONS[key]
    dataset = _dataset(tmp_path)
    config_file = tmp_path / "config_file.toml"
    if default is not None:
        config_file.write_text(tomli_w.dumps({"a": {"output_dir": "o", key: default}}))
        load_config(config_file, dataset)
    config_file.write_text(tomli_w.dumps({"a": {"output_dir": "o", key: _on_value(default)}}))
    with pytest.raises(ConfigError) as caught:
        load_config(config_file, dataset)
    assert f"{key} is not supported by lycolab: {reason}" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("argument", ["train_block_indices=0-3", "exclude_patterns=x", "include_patterns=x"])
def test_network_args_lycolab_does_not_implement_are_refused_by_name(tmp_path, argument):
    config_file = tmp_path / "config_file.toml"
    config_file.write_text(tomli_w.dumps({"a": {"output_dir": "o", "network_args": [argument]}}))
    with pytest.raises(ConfigError, match=f"network_args {argument.split('=')[0]}: not supported by lycolab yet"):
        load_config(config_file, _dataset(tmp_path))
