"""Several training processes (``accelerate launch`` / ``torchrun``): each takes its share of every global batch.

The adapter is not wrapped in DistributedDataParallel: it lives inside the frozen U-Net, not as a model of its own.
Instead each process sums its share of the loss, and at every optimizer step the gradients and the loss are summed
across processes in one flat all-reduce. With the loss divided by the global batch size, this is exactly the
gradient a single process computes on the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def share(items: list, rank: int, world: int) -> tuple[list, range]:
    """This process's contiguous part of a global batch, and the positions it covers (rank r of w gets the r-th
    of w nearly equal slices; a short last batch may leave a process nothing)."""
    per_process = -(-len(items) // world)
    positions = range(rank * per_process, min(len(items), (rank + 1) * per_process))
    return [items[position] for position in positions], positions


def sum_gradients_and_loss(parameters: list[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) every gradient and the loss in one flat float32 buffer; returns the summed loss.

    A process that had no gradient for a parameter (an empty share of a short last batch) adds zeros. The sums are
    copied back into each parameter's own gradient tensor rather than left as views of the buffer, so the optimizer
    and the gradient clipping see tensors laid out exactly as in a single process.
    """
    if not is_distributed():
        return loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([grad.reshape(-1).float() for grad in grads] + [loss.reshape(1).float().to(grads[0].device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for parameter, grad in zip(parameters, grads, strict=True):
        count = grad.numel()
        grad.copy_(flat[offset:offset + count].view_as(grad))
        parameter.grad = grad
        offset += count
    return flat[-1]


def broadcast_module(module: nn.Module) -> None:
    """Make every process start from process 0's adapter weights."""
    if is_distributed():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def broadcast_int(value: int) -> int:
    """Process 0's value of an integer (the run's seed when none was configured)."""
    if not is_distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.int64, device=device)  # NCCL only moves GPU tensors
    dist.broadcast(tensor, src=0)
    return int(tensor.item())
