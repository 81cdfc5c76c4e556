"""LoRA's layer as one autograd op: y = layer(x) + s · up(down(x)), with nothing in the graph but the layer call.

Run as plain modules (``org(x) + lora_up(lora_down(x)) * s``, as sd-scripts and LyCORIS do), every wrapped layer adds
four autograd nodes, two full-size temporaries in the forward (the up projection's output and its scaled copy) and
three in the backward (the scaled output gradient, the down path's input gradient and their sum). Here the up
projection is accumulated into the layer's own output (``addmm_`` / ``baddbmm_`` with ``alpha = s``, so the scale
costs nothing), and the backward accumulates the rank-r input gradient into the layer's own input gradient the same
way; what is left beyond the frozen layer is the rank-r arithmetic. Saved for backward: the input (the tensor the
caller passed, not a cast copy, so q, k and v share one) and the rank-r hidden activations. On the CPU bench this
takes a LoRA's peak RSS from 1.11× the frozen U-Net's to 1.03× (docs/benchmarks.md).

Only the frozen-base case is handled (the layer's weight and bias take no gradient); :func:`fused_forward_applies`
says when this path is exact, and the adapter runs its plain modules otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lycolab.networks.merged_weight import compute_dtype, layer_backward, layer_forward


def fused_dtype(x: torch.Tensor, layer: nn.Module, factor: torch.Tensor) -> torch.dtype | None:
    """The dtype the layer runs in: autocast's where it is on, else the one dtype input, weight and factors share;
    None where they differ (the adapter then casts as its plain modules do)."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype == layer.weight.dtype == factor.dtype:
        return compute_dtype(x)
    return None


def fused_forward_applies(layer: nn.Module) -> bool:
    """Whether :func:`low_rank_forward` can run ``layer``: a frozen Linear, or a frozen ungrouped Conv2d with
    numeric zero padding."""
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"
                                         or isinstance(layer.padding, str)):
        return False
    return not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)


def low_rank_forward(x: torch.Tensor, layer: nn.Module, down: torch.Tensor, up: torch.Tensor, scale: float,
                     dtype: torch.dtype) -> torch.Tensor:
    """``layer(x) + scale · up(down(x))`` computed in ``dtype``: ``down`` is (r, in) or (r, in, kh, kw) for a conv,
    ``up`` (out, r) or (out, r, 1, 1)."""
    if isinstance(layer, nn.Linear):
        return _LowRankLinear.apply(x, layer.weight, layer.bias, down, up, scale, dtype)
    if down.shape[-2:] == (1, 1) and tuple(layer.stride) == (1, 1) and tuple(layer.padding) == (0, 0):
        return _LowRankPointwiseConv.apply(x, layer.weight, layer.bias, down, up, scale, dtype, layer)
    return _LowRankConv.apply(x, layer.weight, layer.bias, down, up, scale, dtype, layer)


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


def _conv_forward(ctx, x, weight, bias, down, up, scale, dtype, layer, down_forward):
    """The frozen conv, the down projection (``down_forward``), and up accumulated into the conv's output."""
    x_c = _as(x, dtype)
    out = layer_forward(layer, x_c, _as(weight, dtype), _as(bias, dtype))
    hidden = down_forward(layer, x_c, _as(down, dtype))  # (N, r, H', W')
    _add_pointwise(out, _as(up, dtype).flatten(1), _columns(hidden), scale)
    ctx.save_for_backward(x, weight, down, up, hidden)
    ctx.scale, ctx.dtype, ctx.layer = scale, dtype, layer
    return out


def _conv_backward(ctx, grad_output, down_backward):
    """The gradients of :func:`_conv_forward`; ``down_backward`` adds the down projection's input gradient to the
    frozen conv's and returns the down weight's gradient."""
    x, weight, down, up, hidden = ctx.saved_tensors
    scale, dtype, layer = ctx.scale, ctx.dtype, ctx.layer
    need_x, _, _, need_down, need_up, _, _, _ = ctx.needs_input_grad
    grad = _as(grad_output, dtype)
    x_c = _as(x, dtype)
    grad_hidden = torch.matmul(_as(up, dtype).flatten(1).t(), _columns(grad)).mul_(scale)  # (N, r, H'·W')
    grad_x = layer_backward(layer, x_c, _as(weight, dtype), grad, True, False)[0] if need_x else None
    grad_down = None
    if need_x or need_down:
        grad_down = down_backward(layer, x_c, _as(down, dtype), grad_hidden.view(hidden.shape), grad_x, need_down)
    grad_up = None
    if need_up:
        grad_up = torch.bmm(_columns(grad), _columns(hidden).transpose(1, 2)).sum(0).mul_(scale).view(up.shape)
    return _as(grad_x, x.dtype), None, None, _as(grad_down, down.dtype), _as(grad_up, up.dtype), None, None, None


def _kernel_down(layer, x, down):
    return layer_forward(layer, x, down, None)  # the layer's kernel, stride and padding, r output channels


def _kernel_down_backward(layer, x, down, grad_hidden, grad_x, need_down):
    lora_grad_x, grad_down = layer_backward(layer, x, down, grad_hidden, grad_x is not None, need_down)
    if grad_x is not None:
        grad_x.add_(lora_grad_x)
    return grad_down


def _pointwise_down(layer, x, down):
    return torch.matmul(down.flatten(1), _columns(x)).view(x.shape[0], -1, *x.shape[2:])


def _pointwise_down_backward(layer, x, down, grad_hidden, grad_x, need_down):
    if grad_x is not None:
        _add_pointwise(grad_x, down.flatten(1).t(), _columns(grad_hidden), 1.0)
    if need_down:
        return torch.bmm(_columns(grad_hidden), _columns(x).transpose(1, 2)).sum(0).view(down.shape)
    return None


def _conv_function(name: str, doc: str, down_forward, down_backward) -> type[torch.autograd.Function]:
    """An autograd op for one kind of conv: :func:`_conv_forward` / :func:`_conv_backward` with its down path."""

    def forward(ctx, x, weight, bias, down, up, scale, dtype, layer):
        return _conv_forward(ctx, x, weight, bias, down, up, scale, dtype, layer, down_forward)

    def backward(ctx, grad_output):
        return _conv_backward(ctx, grad_output, down_backward)

    return type(name, (torch.autograd.Function,), {"__doc__": doc, "forward": staticmethod(forward),
                                                    "backward": staticmethod(backward)})


_LowRankConv = _conv_function(
    "_LowRankConv", "A kxk conv: the down projection is a conv with the layer's kernel, stride and padding.",
    _kernel_down, _kernel_down_backward)
_LowRankPointwiseConv = _conv_function(
    "_LowRankPointwiseConv", "A 1x1 conv (stride 1, no padding): the rank-r side is two matmuls over channels "
    "(mkldnn sends a 1x1 conv with so few output channels to its slow path).", _pointwise_down,
    _pointwise_down_backward)


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
