"""Two CPU processes (torchrun, gloo) sharing each global batch train exactly what one process does with that batch.

The reference is one process training through the same ``Trainer`` with the same global batch, doing each process's
share in turn: a forward and backward per share, autograd adding the second share's gradient to the first's. Every
float operation then runs with the same inputs and shapes as in one of the two processes, and the all-reduce adds the
same two float32 gradients (a + b == b + a exactly), so weights and losses must agree bit for bit on any CPU.

One process running the batch of two in one forward is not compared: its kernels sum the two samples' weight
gradients inside one reduction, in an order that depends on the CPU, and Adam turns such last-bit differences into
steps of the size of the learning rate, so no tolerance on its final weights holds everywhere. That it trains on the
same global batches (images, and so noise and timesteps, which are drawn per global batch) is checked exactly below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import make_shapes_dataset as make_dataset
from safetensors.torch import load_file

from lycolab.config import load_config, write_config_file
from lycolab.data.dataset import BucketedDataset
from lycolab.training.batch_loader import BatchInputs
from lycolab.training.loop import Trainer, plan_run

WORLD = 2


class EveryShareInTurn(Trainer):
    """One process doing, one after another, what each of ``WORLD`` processes does with its share of a batch."""

    def _prepare_data(self) -> None:
        self.world = WORLD  # global batches of train_batch_size x WORLD images, planned as the processes plan them
        super()._prepare_data()

    def micro_step(self, inputs: BatchInputs) -> torch.Tensor:
        loss = torch.zeros(())
        for rank in range(WORLD):
            self.rank = rank
            share = self.batch_reader([inputs.planned], rank)[0]  # what that process's loader reads
            loss = loss + super().micro_step(share)  # the all-reduce's sum of the loss shares
        self.rank = 0
        return loss


def train_every_share_in_turn(config_file: str, output_dir: str) -> None:
    """The reference run; started as its own process so that it has the torchrun processes' single thread."""
    config = load_config(config_file, None, {"train_batch_size": 1, "output_dir": output_dir})
    EveryShareInTurn(config, progress=False).train()


def _run(command: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-3000:]
    return completed.stdout + completed.stderr


def _config(model_dir: Path, data: Path, tmp_path: Path, **overrides):
    return load_config(overrides={
        "pretrained_model_name_or_path": str(model_dir), "train_data_dir": str(data), "resolution": "64",
        "caption_extension": ".txt", "shuffle_caption": True, "network_module": "lycoris.kohya",
        "network_args": ["algo=loha", "conv_dim=2", "conv_alpha=1"], "network_dim": 4, "network_alpha": 2,
        "learning_rate": 2e-3, "max_train_epochs": 2, "seed": 5, "save_precision": "float", "save_every_n_epochs": 1,
        "noise_offset": 0.05, "min_snr_gamma": 5.0, "output_name": "ddp", "output_dir": str(tmp_path / "unused"),
        **overrides,
    })


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    config_file = write_config_file(_config(tiny_model_dir, make_dataset(tmp_path / "train"), tmp_path),
                                    tmp_path / "config_file.toml")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, __file__, str(config_file), str(one)])
    output = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
                   "-m", "lycolab", "train", "--config_file", str(config_file), "--train_batch_size", "1",
                   "--output_dir", str(two)])
    assert "batch size: 1 x 2 processes" in output

    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in ("ddp-000001.safetensors", "ddp.safetensors"):
        single, shared = load_file(str(one / name)), load_file(str(two / name))
        assert single.keys() == shared.keys()
        for key, value in single.items():
            assert torch.equal(shared[key], value), f"{name}: {key}"
    first, last = load_file(str(one / "ddp-000001.safetensors")), load_file(str(one / "ddp.safetensors"))
    assert any(not torch.equal(first[key], last[key]) for key in last), "the second epoch moved the weights"
    rows = [json.loads(line) for line in (two / "loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))  # written once, by process 0
    assert rows == [json.loads(line) for line in (one / "loss.jsonl").read_text().splitlines()]


def test_one_process_with_batch_two_gets_the_global_batches_of_two_processes_with_batch_one(tmp_path):
    data = make_dataset(tmp_path / "train")
    single = _config(tmp_path / "model", data, tmp_path, train_batch_size=WORLD)  # no model is loaded here
    shared = _config(tmp_path / "model", data, tmp_path, train_batch_size=1)
    one = BucketedDataset(single.datasets, single.train_batch_size, seed=5)
    two = BucketedDataset(shared.datasets, shared.train_batch_size, seed=5)
    assert plan_run(single, one) == plan_run(shared, two, WORLD)
    for epoch in (1, 2, 3):
        batches = one.make_batches(epoch)
        assert batches == two.make_batches(epoch, WORLD)
        assert {len(batch) for batch in batches} == {WORLD}


if __name__ == "__main__":
    train_every_share_in_turn(*sys.argv[1:])
