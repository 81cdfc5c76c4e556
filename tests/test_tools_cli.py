"""The adapter-tool commands: resize, merge-adapters, extract, convert and inspect print their report table, take
sd-scripts' / LyCORIS' option names, and fail in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import randomize_parameters
from safetensors import safe_open

from lycolab.cli import main
from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import create_network


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    sd = build_tiny_sd()
    network = create_network(sd.unet, [sd.text_encoder], algo="lora", dim=4, alpha=2, conv_dim=2, conv_alpha=1,
                             network_module="networks.lora")
    randomize_parameters(network.parameters())
    return network.save_weights(tmp_path_factory.mktemp("cli") / "cat.safetensors", dtype=torch.float32,
                                metadata={"ss_num_epochs": "4"})


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """Text-encoder modules only: SVD per module is the tools' cost, and 24 modules show the options work."""
    network = create_network(None, [build_tiny_sd().text_encoder], algo="lora", dim=4, alpha=2)
    randomize_parameters(network.parameters())
    return network.save_weights(tmp_path_factory.mktemp("cli") / "te.safetensors", dtype=torch.float32)


def _run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _ranks(path):
    with safe_open(str(path), "pt") as handle:
        return {handle.get_slice(key).get_shape()[0] for key in handle.keys() if key.endswith("lora_down.weight")}


def test_inspect_prints_the_file_table(lora_file, capsys):
    code, out, _ = _run(capsys, "inspect", lora_file, "--top_tags", 5)
    assert code == 0 and "LoRA / LoCon (139)" in out and "Epochs" in out and "ranks" in out


def test_convert_to_diffusers_and_back_prints_what_it_wrote(lora_file, tmp_path, capsys):
    code, out, _ = _run(capsys, "convert", lora_file, "--to", "diffusers", "--save_to", tmp_path / "peft.safetensors")
    assert code == 0 and "(peft)" in out and "U-Net modules" in out
    code, out, _ = _run(capsys, "convert", tmp_path / "peft.safetensors", "--to", "kohya", "--out",
                        tmp_path / "back.safetensors")
    assert code == 0 and (tmp_path / "back.safetensors").is_file()


def test_resize_takes_sd_scripts_options_and_prints_its_report(small_file, tmp_path, capsys):
    code, out, err = _run(capsys, "resize", "--model", small_file, "--save_to", tmp_path / "r2.safetensors",
                          "--new_rank", 2, "--save_precision", "float")
    assert code == 0, err
    assert "Resized te" in out and _ranks(tmp_path / "r2.safetensors") <= {1, 2}
    code, out, err = _run(capsys, "resize", small_file, "--save_to", tmp_path / "d.safetensors", "--new_rank", 4,
                          "--dynamic_method", "sv_fro", "--dynamic_param", 0.5)
    assert code == 0, err


def test_merge_adapters_takes_ratios_as_option_or_suffix(small_file, tmp_path, capsys):
    code, out, err = _run(capsys, "merge-adapters", "--models", small_file, small_file, "--ratios", 0.5, 0.25,
                          "--save_to", tmp_path / "m.safetensors")
    assert code == 0 and (tmp_path / "m.safetensors").is_file(), err
    code, out, err = _run(capsys, "merge-adapters", "--models", f"{small_file}:0.5", f"{small_file}:0.5",
                          "--new_rank", 3, "--save_to", tmp_path / "s.safetensors")
    assert code == 0 and _ranks(tmp_path / "s.safetensors") <= {1, 2, 3}, err


def test_tool_mistakes_are_one_line_with_the_right_exit_code(lora_file, tmp_path, capsys):
    sd = build_tiny_sd()
    loha = create_network(sd.unet, algo="loha", dim=2, network_module="lycoris.kohya").save_weights(
        tmp_path / "loha.safetensors")
    cases = [
        (("convert", loha, "--to", "peft", "--save_to", tmp_path / "x.safetensors"), 1, "LoHa module"),
        (("resize", lora_file, "--save_to", tmp_path / "y.safetensors"), 1, "give rank="),
        (("resize", "--save_to", tmp_path / "y.safetensors", "--new_rank", 2), 2, "give the adapter once"),
        (("merge-adapters", "--models", lora_file, lora_file, "--ratios", 1, "--save_to", tmp_path / "z.safetensors"),
         2, "give one per model"),
        (("inspect", tmp_path / "missing.safetensors"), 1, "file not found"),
        (("convert", lora_file, "--to", "onnx", "--save_to", tmp_path / "x.safetensors"), 2, "invalid choice"),
    ]
    for argv, expected, said in cases:
        code, _, err = _run(capsys, *argv)
        assert code == expected and said in err, (argv, err)
        assert "Traceback" not in err


def test_extract_of_a_model_from_itself_says_there_is_nothing_to_extract(tiny_model_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "extract", tiny_model_dir, tiny_model_dir, tmp_path / "e.safetensors", "--linear_dim",
                        4, "--conv_dim", 2)
    assert code == 1 and "no difference to extract" in err and "Traceback" not in err


def test_the_tools_run_as_a_real_command(lora_file):
    completed = subprocess.run([sys.executable, "-m", "lycolab", "inspect", str(lora_file)], capture_output=True,
                               text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr
    assert "kohya/LyCORIS" in completed.stdout
