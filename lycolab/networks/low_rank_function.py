"""LoRA's layer as one autograd op: y = layer(x) + s · up(down(x)), with nothing in the graph but the layer call.

Run as plain modules (``org(x) + lora_up(lora_down(x)) * s``, as sd-scripts and LyCORIS do), every wrapped layer adds
four autograd nodes, two full-size temporaries in the forward (the up projection's output and its scaled copy) and
three in the backward (the scaled output gradient, the down path's input gradient and their sum) — on a CPU, where
a Linear of 320 features on 1024 tokens takes about a millisecond, those element-wise passes over the layer's output
cost as much as the rank-r matmuls themselves. Here the up projection is accumulated into the layer's own output
(``addmm_`` / ``baddbmm_`` with ``alpha = s``, so the scale costs nothing), and the backward accumulates the rank-r
input gradient into the layer's own input gradient the same way. Saved for backward: the input (the tensor the
caller passed, not a cast copy, so q, k and v share one) and the rank-r hidden activations.

Only the frozen-base case is handled (the layer's weight and bias take no gradient); :func:`fused_forward_applies`
says when this path is exact, and the adapter runs its plain modules otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(x: torch.Tensor, layer: nn.Module, factor: torch.Tensor) -> torch.dtype | None:
    """The dtype the layer runs in: autocast's where it is on, else the one dtype input, weight and factors share;
    None where they differ (the adapter then casts as its plain modules do)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if x.dtype == layer.weight.dtype == factor.dtype:
        return x.dtype
    return None


def fused_forward_applies(layer: nn.Module) -> bool:
    """Whether :func:`low_rank_forward` can run ``layer``: a frozen, ungrouped Linear or Conv2d."""
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
        return False
    return not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)


def low_rank_forward(x: torch.Tensor, layer: nn.Module, down: torch.Tensor, up: torch.Tensor, scale: float,
                     dtype: torch.dtype) -> torch.Tensor:
    """``layer(x) + scale · up(down(x))`` computed in ``dtype``: ``down`` is (r, in) or (r, in, kh, kw) for a conv,
    ``up`` (out, r) or (out, r, 1, 1)."""
    if isinstance(layer, nn.Linear):
        return _LowRankLinear.apply(x, layer.weight, layer.bias, down, up, scale, dtype)
    geometry = (layer.stride, layer.padding, layer.dilation)
    if down.shape[-2:] == (1, 1) and tuple(layer.stride) == (1, 1) and tuple(layer.padding) == (0, 0):
        return _LowRankPointwiseConv.apply(x, layer.weight, layer.bias, down, up, scale, dtype)
    return _LowRankConv.apply(x, layer.weight, layer.bias, down, up, scale, dtype, geometry)


def _as(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` in ``dtype`` (itself when it already is: the common case, kept free of a call)."""
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


# The ops below get their inputs in the compute dtype already, so autocast (where it is on) leaves them alone.
class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale, dtype):
        flat = _as(x, dtype).reshape(-1, x.shape[-1])
        out = F.linear(flat, _as(weight, dtype), _as(bias, dtype))
        hidden = F.linear(flat, _as(down, dtype))
        out.addmm_(hidden, _as(up, dtype).t(), alpha=scale)
        ctx.save_for_backward(x, weight, down, up, hidden)
        ctx.scale, ctx.dtype = scale, dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, down, up, hidden = ctx.saved_tensors
        scale, dtype = ctx.scale, ctx.dtype
        need_x, _, _, need_down, need_up, _, _ = ctx.needs_input_grad
        grad = _as(grad_output, dtype).reshape(-1, grad_output.shape[-1])
        grad_hidden = grad.mm(_as(up, dtype))  # (tokens, r), the scale still to apply
        grad_x = grad_down = grad_up = None
        if need_x:
            grad_x = grad.mm(_as(weight, dtype)).addmm_(grad_hidden, _as(down, dtype), alpha=scale)
            grad_x = _as(grad_x.view(x.shape), x.dtype)
        if need_down:
            flat = _as(x, dtype).reshape(-1, x.shape[-1])
            grad_down = _as(grad_hidden.t().mm(flat).mul_(scale), down.dtype)
        if need_up:
            grad_up = _as(grad.t().mm(hidden).mul_(scale), up.dtype)
        return grad_x, None, None, grad_down, grad_up, None, None


class _LowRankConv(torch.autograd.Function):
    """A kxk conv: the down projection is a conv with the layer's kernel, stride and padding, the up one 1x1."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale, dtype, geometry):
        stride, padding, dilation = geometry
        x_c = _as(x, dtype)
        out = F.conv2d(x_c, _as(weight, dtype), _as(bias, dtype), stride, padding, dilation)
        hidden = F.conv2d(x_c, _as(down, dtype), None, stride, padding, dilation)
        _add_pointwise(out, _as(up, dtype).flatten(1), _columns(hidden), scale)
        ctx.save_for_backward(x, weight, down, up, hidden)
        ctx.scale, ctx.dtype, ctx.geometry = scale, dtype, geometry
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, down, up, hidden = ctx.saved_tensors
        scale, dtype = ctx.scale, ctx.dtype
        need_x, _, _, need_down, need_up, _, _, _ = ctx.needs_input_grad
        grad = _as(grad_output, dtype)
        x_c, down_c = _as(x, dtype), _as(down, dtype)
        grad_hidden = torch.matmul(_as(up, dtype).flatten(1).t(), _columns(grad)).mul_(scale)  # (N, r, H'·W')
        grad_x = grad_down = None
        if need_x:
            grad_x = _conv_backward(grad, x_c, _as(weight, dtype), ctx.geometry, (True, False))[0]
        if need_x or need_down:
            lora_grad_x, grad_down = _conv_backward(grad_hidden.view(hidden.shape), x_c, down_c, ctx.geometry,
                                                    (need_x, need_down))
            if need_x:
                grad_x.add_(lora_grad_x)
        grad_up = _up_grad(grad, hidden, scale, up) if need_up else None
        return _as(grad_x, x.dtype), None, None, _as(grad_down, down.dtype), grad_up, None, None, None


class _LowRankPointwiseConv(torch.autograd.Function):
    """A 1x1 conv (stride 1, no padding): the rank-r side is two matmuls over channels. mkldnn would run a 1x1 conv
    with so few channels on its slow path, several times slower than the matmul."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale, dtype):
        x_c = _as(x, dtype)
        out = F.conv2d(x_c, _as(weight, dtype), _as(bias, dtype))
        hidden = torch.matmul(_as(down, dtype).flatten(1), _columns(x_c))  # (N, r, H·W)
        _add_pointwise(out, _as(up, dtype).flatten(1), hidden, scale)
        ctx.save_for_backward(x, weight, down, up, hidden)
        ctx.scale, ctx.dtype = scale, dtype
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, down, up, hidden = ctx.saved_tensors
        scale, dtype = ctx.scale, ctx.dtype
        need_x, _, _, need_down, need_up, _, _ = ctx.needs_input_grad
        grad = _as(grad_output, dtype)
        x_c, down_c = _as(x, dtype), _as(down, dtype)
        grad_hidden = torch.matmul(_as(up, dtype).flatten(1).t(), _columns(grad))  # (N, r, H·W), scale to apply
        grad_x = grad_down = None
        if need_x:
            grad_x = _conv_backward(grad, x_c, _as(weight, dtype), ((1, 1), (0, 0), (1, 1)), (True, False))[0]
            _add_pointwise(grad_x, down_c.flatten(1).t(), grad_hidden, scale)
        if need_down:
            grad_down = torch.bmm(grad_hidden, _columns(x_c).transpose(1, 2)).sum(0).mul_(scale).view(down.shape)
        grad_up = _up_grad(grad, hidden, scale, up) if need_up else None
        return _as(grad_x, x.dtype), None, None, _as(grad_down, down.dtype), grad_up, None, None


def _columns(tensor: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as (N, C, H·W): a view where the layout allows, else a copy."""
    return tensor.reshape(tensor.shape[0], tensor.shape[1], -1)


def _add_pointwise(out: torch.Tensor, matrix: torch.Tensor, columns: torch.Tensor, scale: float) -> None:
    """out += scale · (``matrix`` @ ``columns`` per sample), i.e. a 1x1 conv; in place where ``out`` is contiguous."""
    batch = out.shape[0]
    if out.is_contiguous():
        _columns(out).baddbmm_(matrix.expand(batch, *matrix.shape), columns, alpha=scale)
    else:
        out.add_(torch.matmul(matrix, columns).view(out.shape), alpha=scale)


def _up_grad(grad: torch.Tensor, hidden: torch.Tensor, scale: float, up: torch.Tensor) -> torch.Tensor:
    """∂L/∂up of a 1x1 up projection: scale · Σ over samples and pixels of grad ⊗ hidden."""
    grad_up = torch.bmm(_columns(grad), _columns(hidden).transpose(1, 2)).sum(0).mul_(scale)
    return _as(grad_up.view(up.shape), up.dtype)


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geometry, need: tuple[bool, bool]
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(∂L/∂x, ∂L/∂weight) of a bias-free conv, each only where ``need`` asks for it."""
    stride, padding, dilation = geometry
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation,
                                                                 False, [0, 0], 1, [*need, False])
    return grad_x, grad_weight
