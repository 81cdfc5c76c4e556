"""Run a layer with W + m·ΔW while keeping nothing but the input and the small factors for backward.

When ΔW has no cheap factored form for the call at hand (LoHa with many tokens per layer, the tucker variants), the
layer must run with a merged weight. Done naively (as the reference LyCORIS package does) autograd keeps ΔW and the
merged weight of every layer alive until backward — a second copy of the model — and runs the base and delta layers
separately. Here a custom autograd function builds
the merged weight, runs the layer once and frees it; backward rebuilds it from the factors (cheap next to the layer
itself), gets the input and weight gradients from the layer's own backward, and maps the weight gradient onto the
factors. How the merged weight is built and how its gradient reaches the factors is the adapter's business
(:class:`MergedWeightAdapter` below gives a generic version; LoHa has a cache-friendly one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class MergeRecipe(Protocol):
    """What :class:`MergedWeightFunction` needs from an adapter."""

    def merged_weight(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
        """W + row_scale[:, None] · ΔW(factors), in ``dtype`` (may live in ``WORKSPACE``'s "merged" slot)."""

    def merged_weight_backward(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                               dtype: torch.dtype, grad_merged: WeightGradient, need_merged: bool
                               ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """(the merged weight again if ``need_merged``, gradients of the factors) given ∂L/∂merged."""


class Workspace:
    """Reusable full-size buffers for merged weights and weight gradients, one per (slot, device, dtype).

    Those tensors live for a single layer call, but allocating a fresh 50-100 MB block for every layer of every step
    costs more than the arithmetic on CPU (the OS hands out zeroed pages each time). A buffer grows to the largest
    layer and is then reused; it is only ever used inside one forward or one backward call, never across them.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, slot: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device
             ) -> torch.Tensor:
        key = (slot, torch.device(device), dtype)
        size = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < size:
            self._buffers.pop(key, None)
            buffer = self._buffers[key] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


WORKSPACE = Workspace()


def layer_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@dataclass(frozen=True)
class WeightGradient:
    """∂L/∂W of a Linear/Conv2d kept as a product ``left · right`` (out × in·k·k), never formed in full unless asked.

    Row blocks of it can then be made where they are consumed (in cache) instead of written to memory and read back.
    """

    left: torch.Tensor  # (out, M): the output gradient, one column per token / pixel
    right: torch.Tensor | None  # (M, in·k·k): the inputs (im2col'ed for a conv); None when ``left`` is ∂L/∂W itself
    shape: torch.Size  # the layer's weight shape

    def rows(self, rows: slice) -> torch.Tensor:
        return self.left[rows] if self.right is None else self.left[rows] @ self.right

    def full(self) -> torch.Tensor:
        if self.right is None:
            return self.left.view(self.shape)
        out = WORKSPACE.take("grad", (self.left.shape[0], self.right.shape[1]), self.left.dtype, self.left.device)
        return torch.mm(self.left, self.right, out=out).view(self.shape)


def layer_weight_grad(layer: nn.Module, x: torch.Tensor, grad_output: torch.Tensor) -> WeightGradient:
    """∂L/∂weight of ``layer_forward`` (it does not depend on the weight's value)."""
    shape = layer.weight.shape
    if isinstance(layer, nn.Linear):
        return WeightGradient(grad_output.reshape(-1, shape[0]).t(), x.reshape(-1, shape[1]), shape)
    if layer.groups == 1:
        columns = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, in·k·k, L)
        left = grad_output.flatten(2).transpose(0, 1).reshape(shape[0], -1)  # (out, N·L)
        return WeightGradient(left, columns.transpose(1, 2).reshape(-1, columns.shape[1]), shape)
    full = layer_backward(layer, x, layer.weight, grad_output, need_input=False, need_weight=True)[1]
    return WeightGradient(full.reshape(shape[0], -1), None, shape)


def layer_backward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, grad_output: torch.Tensor,
                   need_input: bool, need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(∂L/∂x, ∂L/∂weight) of ``layer_forward(layer, x, weight)``; ``weight`` may have another out-channel count."""
    if isinstance(layer, nn.Linear):
        grad_input = grad_output.matmul(weight) if need_input else None
        grad_weight = None
        if need_weight:
            grad_weight = grad_output.reshape(-1, weight.shape[0]).t().mm(x.reshape(-1, weight.shape[1]))
        return grad_input, grad_weight
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_output, x, weight, None, list(layer.stride), list(layer.padding), list(layer.dilation), False,
        [0, 0], layer.groups, [need_input, need_weight, False],
    )
    return grad_input, grad_weight


def layer_input_grad(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, grad_output: torch.Tensor
                     ) -> torch.Tensor:
    return layer_backward(layer, x, weight, grad_output, True, False)[0]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer runs in: autocast's when active (mixed precision), else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class MergedWeightFunction(torch.autograd.Function):
    """``layer(x)`` with weight W + row_scale·ΔW(factors); ΔW is rebuilt in backward instead of stored."""

    @staticmethod
    def forward(ctx, x, layer: nn.Module, recipe: MergeRecipe, row_scale: torch.Tensor, *factors: torch.Tensor
                ) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.no_grad():
            merged = recipe.merged_weight(layer.weight, list(factors), row_scale, dtype)
            bias = None if layer.bias is None else layer.bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                output = layer_forward(layer, x.to(dtype), merged, bias)
        ctx.layer, ctx.recipe, ctx.dtype, ctx.input_dtype = layer, recipe, dtype, x.dtype
        ctx.save_for_backward(x, row_scale, *factors)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, row_scale, *factors = ctx.saved_tensors
        layer, dtype = ctx.layer, ctx.dtype
        need_input = ctx.needs_input_grad[0]
        with torch.no_grad():
            x = x.to(dtype)
            grad_output = grad_output.to(dtype)
            merged, factor_grads = ctx.recipe.merged_weight_backward(
                layer.weight, factors, row_scale, dtype, layer_weight_grad(layer, x, grad_output), need_input)
            grad_input = layer_input_grad(layer, x, merged, grad_output).to(ctx.input_dtype) if need_input else None
        factor_grads = [grad if needed else None
                        for grad, needed in zip(factor_grads, ctx.needs_input_grad[4:], strict=True)]
        return (grad_input, None, None, None, *factor_grads)


def merged_weight_forward(x: torch.Tensor, layer: nn.Module, recipe: MergeRecipe, factors: list[torch.Tensor],
                          row_scale: torch.Tensor) -> torch.Tensor:
    """Apply ``layer`` with its weight plus ``row_scale[:, None] · ΔW(factors)`` (see :class:`MergeRecipe`)."""
    return MergedWeightFunction.apply(x, layer, recipe, row_scale, *factors)
