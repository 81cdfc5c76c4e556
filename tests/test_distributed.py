"""Two CPU processes (torchrun, gloo) sharing each global batch train what one process does on the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import make_shapes_dataset as make_dataset
from safetensors.torch import load_file

from lycolab.config import load_config, write_config_file


def _run(command: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-3000:]
    return completed.stdout + completed.stderr


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "train")
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(data), "resolution": "64",
        "caption_extension": ".txt", "shuffle_caption": True, "network_module": "lycoris.kohya",
        "network_args": ["algo=loha", "conv_dim=2", "conv_alpha=1"], "network_dim": 4, "network_alpha": 2,
        "learning_rate": 2e-3, "max_train_epochs": 2, "seed": 5, "save_precision": "float", "save_every_n_epochs": 1,
        "noise_offset": 0.05, "min_snr_gamma": 5.0, "output_name": "ddp", "output_dir": str(tmp_path / "unused"),
    })
    config_file = write_config_file(config, tmp_path / "config_file.toml")
    lycolab = ["-m", "lycolab", "train", "--config_file", str(config_file)]
    _run([sys.executable, *lycolab, "--train_batch_size", "2", "--output_dir", str(tmp_path / "one")])
    output = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *lycolab,
                   "--train_batch_size", "1", "--output_dir", str(tmp_path / "two")])
    assert "batch size: 1 x 2 processes" in output

    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    single, shared = load_file(str(one / "ddp.safetensors")), load_file(str(two / "ddp.safetensors"))
    initial_gap = 0.0
    for key, value in single.items():
        # float32 sums in another order, amplified a little by Adam: 5e-5 is 2.5 % of one step (lr 2e-3)
        assert torch.allclose(shared[key], value, rtol=1e-3, atol=5e-5), key
        initial_gap = max(initial_gap, (value - load_file(str(one / "ddp-000001.safetensors"))[key]).abs().max())
    assert initial_gap > 1e-4, "training moved the weights, so the comparison means something"
    rows = [json.loads(line) for line in (two / "loss.jsonl").read_text().splitlines()]
    single_rows = [json.loads(line) for line in (one / "loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))  # written once, by process 0
    for row, reference in zip(rows, single_rows, strict=True):
        assert abs(row["loss"] - reference["loss"]) < 1e-5
