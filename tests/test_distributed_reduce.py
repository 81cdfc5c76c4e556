"""What the processes exchange: each one's share of a batch, the summed gradients and loss, process 0's weights.

The sums are checked bit for bit against one process adding the same float32 numbers: with two processes every
element is one addition of two numbers, and float addition is commutative, so no order of summation can differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from lycolab.training import distributed

WORLD = 2
SHAPES = [((3, 4), torch.float32), ((5,), torch.float32), ((2, 3, 3), torch.bfloat16)]
NO_GRAD_ON_LAST_RANK = 1  # a parameter the last process has no gradient for, as after an empty share


def _gradients(rank: int) -> list[torch.Tensor | None]:
    """Values spread over many binades, so that their sums round (and a wrong order or dtype would show)."""
    generator = torch.Generator().manual_seed(rank)
    grads: list[torch.Tensor | None] = []
    for index, (shape, dtype) in enumerate(SHAPES):
        scale = 10.0 ** torch.randint(-6, 6, shape, generator=generator)
        grads.append(None if rank == WORLD - 1 and index == NO_GRAD_ON_LAST_RANK
                     else (torch.randn(shape, generator=generator) * scale).to(dtype))
    return grads


def exchange(rank: int, store: str, output: str) -> None:
    """One process: reduce its gradients and loss, take process 0's module and seed, save what it ended with."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        parameters = [nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in SHAPES]
        for parameter, grad in zip(parameters, _gradients(rank), strict=True):
            parameter.grad = grad
        loss = distributed.sum_gradients_and_loss(parameters, torch.tensor(0.1 + rank / 3))
        module = nn.Linear(3, 2)
        nn.init.constant_(module.weight, float(rank + 1))
        distributed.broadcast_module(module)
        seed = distributed.broadcast_int(1000 + rank)
        tensors = {f"grad{index}": parameter.grad.clone() for index, parameter in enumerate(parameters)}
        save_file({**tensors, "loss": loss.clone(), "weight": module.weight.detach().clone(),
                   "seed": torch.tensor([seed])}, output)
    finally:
        dist.destroy_process_group()


def test_two_processes_sum_gradients_and_loss_bit_for_bit_as_one_process_adds_them(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = [tmp_path / f"rank{rank}.safetensors" for rank in range(WORLD)]
    processes = [subprocess.Popen([sys.executable, __file__, str(rank), str(tmp_path / "store"), str(output)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank, output in enumerate(outputs)]
    for process in processes:
        log, _ = process.communicate(timeout=120)
        assert process.returncode == 0, log[-3000:]

    per_rank = [_gradients(rank) for rank in range(WORLD)]
    for rank, output in enumerate(outputs):
        result = load_file(str(output))
        for index, (_, dtype) in enumerate(SHAPES):
            expected = sum((grads[index].float() for grads in per_rank if grads[index] is not None),
                           torch.zeros(SHAPES[index][0])).to(dtype)
            assert result[f"grad{index}"].dtype == dtype
            assert torch.equal(result[f"grad{index}"], expected), (rank, index)
        assert torch.equal(result["loss"], torch.tensor(0.1) + torch.tensor(0.1 + 1 / 3))
        assert torch.equal(result["weight"], torch.ones(2, 3)), "process 0's weights everywhere"
        assert int(result["seed"]) == 1000, "process 0's seed everywhere"


def test_one_process_keeps_its_gradients_and_loss():
    parameter = nn.Parameter(torch.zeros(3))
    parameter.grad = torch.tensor([1.0, -2.0, 3.0])
    grad, loss = parameter.grad, torch.tensor(0.25)
    assert distributed.sum_gradients_and_loss([parameter], loss) is loss
    assert parameter.grad is grad and torch.equal(grad, torch.tensor([1.0, -2.0, 3.0]))
    assert distributed.broadcast_int(7) == 7


@given(size=st.integers(0, 40), world=st.integers(1, 8))
def test_the_shares_of_all_processes_are_the_batch_in_order(size, world):
    batch = [f"image{index}" for index in range(size)]
    shares = [distributed.share(batch, rank, world) for rank in range(world)]
    assert [item for items, _ in shares for item in items] == batch
    assert [position for _, positions in shares for position in positions] == list(range(size))
    assert all(len(items) <= -(-size // world) for items, _ in shares)
    assert all(items == [batch[position] for position in positions] for items, positions in shares)


if __name__ == "__main__":
    exchange(int(sys.argv[1]), sys.argv[2], sys.argv[3])
