"""DoRA (``dora_wd``): the adapted weight split into a trained magnitude and a direction, as LyCORIS 4.1.3 has it.

With V = W + ΔW (ΔW the algorithm's own, scale, scalar and rank-dropout mask included, the multiplier not), the
layer runs with W' = V · s, where s = g / (‖V‖ + ε) and g is the trainable ``dora_scale``. The norm is taken per
output row (``wd_on_output``, g of shape (out, 1, …)) or per input column (g of shape (1, in, 1, …)); ε is the
machine epsilon of g's dtype; g starts as the original weight's norms, so W' = W + ΔW at first. The norm is not
detached (the DoRA paper suggests detaching it; LyCORIS does not). A multiplier m ≠ 1 makes it s = m·(s − 1) + 1,
i.e. W' = V + m·(V·g/‖V‖ − V): multiplier 0 leaves W + ΔW, not W (LyCORIS' semantics, kept for the forward).

W' is a full weight, not a side path, so the layer must run with it. Done naively (as LyCORIS does) autograd keeps V,
its norm, W' and W' − W of every layer until backward and runs the layer twice (base and delta). Here
:class:`DecomposedWeightFunction` builds W' in a reused buffer, runs the layer once and frees it; backward rebuilds V
from the factors and maps ∂L/∂W' onto g and onto ΔW, which the adapter's own merge recipe
(``merged_weight_backward``) takes to its factors.
"""

from __future__ import annotations

import torch
from torch import nn

from lycolab.networks.merged_weight import (
    MergeRecipe,
    WeightGradient,
    compute_dtype,
    layer_forward,
    layer_input_grad,
    layer_weight_grad,
)


def initial_magnitude(weight: torch.Tensor, on_output: bool) -> torch.Tensor:
    """g at creation: the original weight's norms (float32), per output row or per input column, as LyCORIS
    computes them (the same ops, so the values are bit-identical)."""
    weight = weight.detach().cpu().clone().float()
    ones = [1] * (weight.dim() - 1)
    if on_output:
        return torch.norm(weight.reshape(weight.shape[0], -1), dim=1, keepdim=True).reshape(weight.shape[0], *ones)
    columns = weight.transpose(1, 0).reshape(weight.shape[1], -1)
    return torch.norm(columns, dim=1, keepdim=True).reshape(weight.shape[1], *ones).transpose(1, 0)


def magnitude_on_output(magnitude: torch.Tensor, weight_shape: tuple[int, ...]) -> bool:
    """Whether a file's ``dora_scale`` holds one norm per output row (else per input column); ValueError if it fits
    neither (a file for another layer)."""
    out_dim, in_dim = weight_shape[:2]
    if magnitude.dim() >= 1 and magnitude.shape[0] == out_dim and magnitude.numel() == out_dim:
        return True
    if magnitude.dim() >= 2 and magnitude.shape[1] == in_dim and magnitude.numel() == in_dim:
        return False
    raise ValueError(f"dora_scale of shape {tuple(magnitude.shape)} fits no axis of a {tuple(weight_shape)} weight")


def magnitude_shape(weight_shape: tuple[int, ...], on_output: bool) -> tuple[int, ...]:
    ones = [1] * (len(weight_shape) - 1)
    return (weight_shape[0], *ones) if on_output else (1, weight_shape[1], *ones[1:])


def _norm_axes(merged: torch.Tensor, on_output: bool) -> tuple[int, ...]:
    return tuple(axis for axis in range(merged.dim()) if axis != (0 if on_output else 1))


def direction_norm(merged: torch.Tensor, on_output: bool) -> torch.Tensor:
    """‖V‖ per output row or input column, shaped like g (ε not added)."""
    if on_output:  # a view and one reduction, no copy of V
        rows = merged.reshape(merged.shape[0], -1)
        return torch.linalg.vector_norm(rows, dim=1).view(magnitude_shape(tuple(merged.shape), True))
    return torch.linalg.vector_norm(merged, dim=_norm_axes(merged, False), keepdim=True)


def decomposition_scale(raw_norm: torch.Tensor, magnitude: torch.Tensor, multiplier: float) -> torch.Tensor:
    """s with W' = V · s: g / (‖V‖ + ε), and m·(s − 1) + 1 for a multiplier m ≠ 1 (LyCORIS' expression)."""
    scale = magnitude / (raw_norm + torch.finfo(raw_norm.dtype).eps)
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return scale


def decompose(merged: torch.Tensor, magnitude: torch.Tensor, multiplier: float, on_output: bool) -> torch.Tensor:
    """W' from V = W + ΔW with plain (differentiable) ops: the formula the fast path must reproduce."""
    merged = merged.to(magnitude.dtype)
    return merged * decomposition_scale(direction_norm(merged, on_output), magnitude, multiplier)


def _axis_dot(first: torch.Tensor, second: torch.Tensor, on_output: bool) -> torch.Tensor:
    """Σ first ⊙ second over the norm's axes, shaped like g."""
    if on_output:
        rows = first.shape[0]
        dot = torch.bmm(first.reshape(rows, 1, -1), second.reshape(rows, -1, 1))
        return dot.view(magnitude_shape(tuple(first.shape), True))
    return torch.einsum("oi...,oi...->i", first, second).view(magnitude_shape(tuple(first.shape), False))


class DecomposedWeightFunction(torch.autograd.Function):
    """``layer(x)`` with weight W' = decompose(W + ΔW(factors)); W' is rebuilt in backward instead of stored.

    ``row_mask`` multiplies ΔW's rows (rank dropout; the multiplier is not in it, it acts on the decomposition).
    """

    @staticmethod
    def forward(ctx, x, layer: nn.Module, recipe: MergeRecipe, row_mask: torch.Tensor, multiplier: float,
                on_output: bool, magnitude: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.no_grad():
            merged = recipe.merged_weight(layer.weight, list(factors), row_mask, magnitude.dtype)  # V, in a buffer
            merged.mul_(decomposition_scale(direction_norm(merged, on_output), magnitude, multiplier))
            bias = None if layer.bias is None else layer.bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                output = layer_forward(layer, x.to(dtype), merged.to(dtype), bias)
        ctx.layer, ctx.recipe, ctx.dtype, ctx.input_dtype = layer, recipe, dtype, x.dtype
        ctx.multiplier, ctx.on_output = multiplier, on_output
        ctx.save_for_backward(x, row_mask, magnitude, *factors)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, row_mask, magnitude, *factors = ctx.saved_tensors
        layer, dtype, multiplier, on_output = ctx.layer, ctx.dtype, ctx.multiplier, ctx.on_output
        with torch.no_grad():
            x, grad_output = x.to(dtype), grad_output.to(dtype)
            merged = ctx.recipe.merged_weight(layer.weight, factors, row_mask, magnitude.dtype)  # V again
            raw_norm = direction_norm(merged, on_output)
            ratio = magnitude / (raw_norm + torch.finfo(raw_norm.dtype).eps)  # g / ‖V‖ (ε included)
            scale = ratio if multiplier == 1 else multiplier * (ratio - 1) + 1
            # ∂L/∂W' by im2col + matmul: on CPU that beats convolution_backward's weight gradient for U-Net shapes
            grad = layer_weight_grad(layer, x, grad_output).full().to(magnitude.dtype)
            along = _axis_dot(grad, merged, on_output)  # ∂L/∂s
            grad_magnitude = along * (multiplier / (raw_norm + torch.finfo(raw_norm.dtype).eps))
            # ∂L/∂V = s·∂L/∂W' + (∂L/∂‖V‖)·V/‖V‖ with ∂L/∂‖V‖ = −∂L/∂g · g/‖V‖ (norm's gradient 0 at V = 0)
            norm_coefficient = torch.where(raw_norm > 0, -grad_magnitude * ratio / raw_norm.clamp(min=1e-30), 0.0)
            grad.mul_(scale).addcmul_(merged, norm_coefficient)
            grad_input = None
            if ctx.needs_input_grad[0]:
                merged.mul_(scale)  # W' in V's buffer: V is no longer needed
                grad_input = layer_input_grad(layer, x, merged.to(dtype), grad_output).to(ctx.input_dtype)
            delta_gradient = WeightGradient(grad.reshape(grad.shape[0], -1), None, layer.weight.shape)
            _, factor_grads = ctx.recipe.merged_weight_backward(layer.weight, factors, row_mask, magnitude.dtype,
                                                                delta_gradient, False)
        factor_grads = [grad if needed else None
                        for grad, needed in zip(factor_grads, ctx.needs_input_grad[7:], strict=True)]
        grad_magnitude = grad_magnitude if ctx.needs_input_grad[6] else None
        return (grad_input, None, None, None, None, None, grad_magnitude, *factor_grads)


def decomposed_forward(x: torch.Tensor, layer: nn.Module, recipe: MergeRecipe, factors: list[torch.Tensor],
                       row_mask: torch.Tensor, magnitude: torch.Tensor, multiplier: float, on_output: bool
                       ) -> torch.Tensor:
    """Apply ``layer`` with DoRA's W' (see the module docstring); ``recipe`` builds W + row_mask·ΔW(factors)."""
    return DecomposedWeightFunction.apply(x, layer, recipe, row_mask, float(multiplier), bool(on_output), magnitude,
                                          *factors)
