"""``inspect_adapter``: what a file holds and how it was trained, from its header alone, whatever its metadata."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_parameters
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import AdapterFileError, create_network
from lycolab.tools.convert import convert_adapter
from lycolab.tools.inspect import AdapterInfo, inspect_adapter

TRAINING_METADATA = {"ss_learning_rate": "0.0001", "ss_num_epochs": "10", "ss_optimizer": "AdamW8bit",
                     "ss_resolution": "(512, 512)", "ss_base_model_version": "sd_v1",
                     "ss_tag_frequency": json.dumps({"10_cat": {"cat": 20, "solo": 12}, "2_dog": {"cat": 1}}),
                     "ss_dataset_dirs": json.dumps({"10_cat": {"n_repeats": 10, "img_count": 24}})}


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    sd = build_tiny_sd()
    network = create_network(sd.unet, [sd.text_encoder], algo="lora", dim=4, alpha=2, conv_dim=2, conv_alpha=1,
                             network_module="networks.lora")
    randomize_parameters(network.parameters())
    return network.save_weights(tmp_path_factory.mktemp("inspect") / "cat.safetensors", metadata=TRAINING_METADATA)


def _rows(info: AdapterInfo) -> dict[str, str]:
    return {row[""]: str(row["value"]) for row in info.table().rows}


def test_inspect_shows_algorithm_modules_ranks_alphas_settings_tags_folders_and_hashes(lora_file):
    info = inspect_adapter(lora_file, top=2)
    assert info.layout == "kohya" and info.algorithms == {"LoRA / LoCon": 139}
    assert info.components == {"U-Net": 115, "text encoder": 24}
    assert info.ranks == {4: 121, 2: 18} and info.alphas == {2.0: 121, 1.0: 18}
    rows = _rows(info)
    assert rows["Network module"] == "networks.lora" and rows["Conv dim"] == "2" and rows["Epochs"] == "10"
    assert rows["Learning rate"] == "0.0001" and rows["Optimizer"] == "AdamW8bit"
    assert info.tags == [("cat", 21), ("solo", 12)] and rows["top tags"] == "cat (21), solo (12)"
    assert rows["dataset 10_cat"] == "24 images × 10 repeats"
    assert len(rows["model hash (sshs_model_hash)"]) == 64
    assert "Network alpha" in str(info) and "<table>" in info._repr_html_()


def test_a_file_whose_weights_diverged_is_still_inspected_because_only_the_header_is_read(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.full((2, 8), float("nan")),
               "lora_unet_x.lora_up.weight": torch.zeros(8, 2), "lora_unet_x.alpha": torch.tensor(1.0)}
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    info = inspect_adapter(tmp_path / "nan.safetensors")
    assert info.ranks == {2: 1} and info.alphas == {1.0: 1} and info.settings == []
    assert "no training metadata" in str(info)


def test_a_loha_file_and_a_peft_file_are_named_with_their_alphas(lora_file, tmp_path):
    sd = build_tiny_sd()
    network = create_network(sd.unet, algo="loha", dim=4, alpha=2, network_module="lycoris.kohya")
    loha = inspect_adapter(network.save_weights(tmp_path / "loha.safetensors"))
    assert loha.algorithms == {"LoHa": len(network.adapters)} and set(loha.ranks) == {4}
    assert _rows(loha)["Algorithm"] == "loha"
    peft = inspect_adapter(convert_adapter(lora_file, tmp_path / "peft.safetensors", "peft").out)
    assert peft.layout == "peft" and peft.alphas == {2.0: 121, 1.0: 18} and _rows(peft)["Epochs"] == "10"


def test_what_is_not_a_safetensors_adapter_is_one_line(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "x.ckpt").write_bytes(b"")
    for path, said in ((tmp_path / "x.safetensors", "not a readable safetensors file"),
                       (tmp_path / "x.ckpt", "only .safetensors"), (tmp_path / "none.safetensors", "not found")):
        with pytest.raises(AdapterFileError, match=said) as caught:
            inspect_adapter(path)
        assert "\n" not in str(caught.value)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=3), max_leaves=8)
KEYS = st.sampled_from(sorted(TRAINING_METADATA) + ["ss_network_args", "ss_network_dim", "ss_network_module",
                                                    "ss_datasets", "sshs_model_hash", "lycolab_kohya_alphas"])
VALUES = st.text(max_size=40) | JSON.map(json.dumps) | st.just("[" * 3000)


@given(metadata=st.dictionaries(KEYS | st.text(max_size=10), VALUES, max_size=8))
def test_any_metadata_is_shown_or_left_out_never_an_error(metadata, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "a.safetensors"
    save_file({"lora_te_y.lora_down.weight": torch.ones(2, 3), "lora_te_y.lora_up.weight": torch.ones(3, 2)},
              str(path), metadata)
    info = inspect_adapter(path)
    assert info.algorithms == {"LoRA / LoCon": 1} and info.ranks == {2: 1}
    assert str(info) and info._repr_html_()
