"""Full (native fine-tuning as an adapter): ΔW is a whole trained matrix, ``diff``, and the bias gets ``diff_b``.

Keys as LyCORIS 4.1.3 writes them: ``diff`` in the layer's weight shape and, for a layer with a bias, ``diff_b``
(out,); both start at zero, and network_dim/alpha are ignored (no ``alpha`` key, no scale). A file's ``diff_b`` is
applied even where the layer has no bias, as LyCORIS does at multiplier 1.

LyCORIS trains this by replacing the layer's weight with a trained copy W + diff. Here the base weight is never
touched (``restore()`` gives the model back as it was): the layer runs once with W + m·diff built in a reused buffer
by :class:`FullWeightFunction`, which keeps no merged copy alive until backward (autograd would keep one per layer:
a second model in memory) and rebuilds it there. The bias part is added to the output.

Dropouts as LyCORIS: ``rank_dropout`` drops whole output rows of diff (and of diff_b), rescaled by the kept
fraction if ``rank_dropout_scale``; ``module_dropout`` acts; ``dropout`` is unused. LyCORIS has no max-norm rule
for it (its ``apply_max_norm`` is the base no-op).
"""

from __future__ import annotations

import torch
from torch import nn

from lycolab.networks.base import AdapterModule, AdapterShapeError, new_parameter
from lycolab.networks.merged_weight import WORKSPACE, compute_dtype, layer_backward, layer_forward
from lycolab.networks.registry import AdapterOptions, Algorithm


class FullModule(AdapterModule):
    algo = "full"
    options_class = AdapterOptions
    has_max_norm_rule = False  # LyCORIS' FullModule.apply_max_norm is the base no-op

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0,
                 options: AdapterOptions | None = None, **option_values):
        super().__init__(lora_name, org_module, dim, None, multiplier, options, **option_values)
        self.register_buffer("alpha", self.alpha, persistent=False)  # LyCORIS' full files hold no alpha
        self.diff = nn.Parameter(torch.zeros(org_module.weight.shape))
        bias = org_module.bias
        self.diff_b = nn.Parameter(torch.zeros(bias.shape)) if bias is not None else None

    @classmethod
    def from_weights(cls, lora_name: str, org_module: nn.Module, weights: dict[str, torch.Tensor],
                     multiplier: float = 1.0) -> FullModule:
        """A Linear's ``diff`` on a 1x1 conv (SD 2 vs SD 1 ``proj_in``) and the reverse are reshaped."""
        module = cls(lora_name, org_module, 1, None, multiplier)
        module.diff = new_parameter(_in_shape(weights["diff"], module.weight_shape))
        module.check_shape()
        if "diff_b" in weights:
            rows = (module.weight_shape[0],)
            module.diff_b = new_parameter(_in_shape(weights["diff_b"], rows))
            if tuple(module.diff_b.shape) != rows:
                raise AdapterShapeError(f"{lora_name}: the file's diff_b is {tuple(module.diff_b.shape)} but the "
                                        f"layer has {rows[0]} outputs; is the adapter for another base model?")
        return module

    def own_factors(self) -> list[torch.Tensor]:
        return [self.diff]

    def factor_delta(self, diff: torch.Tensor) -> torch.Tensor:
        return diff

    def delta_bias(self) -> torch.Tensor | None:
        """What the adapter adds to the layer's bias at multiplier 1 (None: nothing); a merge must add it too."""
        return self.diff_b

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        row_scale = self.row_scale(x.device)
        output = FullWeightFunction.apply(x, self.org_module, row_scale, self.diff)
        if self.diff_b is None:
            return output
        bias = (self.diff_b * row_scale.to(self.diff_b.dtype)).to(output.dtype)
        return output + bias.reshape((-1, 1, 1) if self.is_conv else (-1,))

    def scale_delta(self, ratio: torch.Tensor) -> None:
        """LyCORIS has no max-norm rule for full: ΔW is left as it is."""


class FullWeightFunction(torch.autograd.Function):
    """``layer(x)`` with weight W + row_scale ⊙ diff, built in a reused buffer for the call and again in backward.

    Backward takes ∂L/∂x and ∂L/∂W from one call of the layer's own backward (for a conv, one native
    ``convolution_backward`` rather than an im2col product), then ∂L/∂diff = row_scale ⊙ ∂L/∂W.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module, row_scale: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.no_grad():
            merged = _merged_weight(layer.weight, diff, row_scale, dtype)
            bias = None if layer.bias is None else layer.bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                output = layer_forward(layer, x.to(dtype), merged, bias)
        ctx.layer, ctx.dtype, ctx.input_dtype = layer, dtype, x.dtype
        ctx.save_for_backward(x, row_scale, diff)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, row_scale, diff = ctx.saved_tensors
        need_input, need_diff = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        with torch.no_grad():
            merged = _merged_weight(ctx.layer.weight, diff, row_scale, ctx.dtype)
            grad_x, grad_weight = layer_backward(ctx.layer, x.to(ctx.dtype), merged, grad_output.to(ctx.dtype),
                                                 need_input, need_diff)
            grad_diff = None if grad_weight is None else grad_weight.to(diff.dtype) * _per_row(row_scale, diff)
        return (None if grad_x is None else grad_x.to(ctx.input_dtype)), None, None, grad_diff


def _merged_weight(weight: torch.Tensor, diff: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype
                   ) -> torch.Tensor:
    """W + row_scale ⊙ diff in one pass into the shared buffer, in ``dtype`` (no full-size temporary)."""
    merged = WORKSPACE.take("merged", weight.shape, diff.dtype, weight.device)
    torch.addcmul(weight.to(diff.dtype), diff, _per_row(row_scale, diff), out=merged)
    return merged.to(dtype)


def _per_row(row_scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return row_scale.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _in_shape(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` reshaped to ``shape`` when only the layout differs (else as it is, for the shape check to name)."""
    return tensor.reshape(shape) if tensor.numel() == torch.Size(shape).numel() else tensor


ALGORITHM = Algorithm(
    name="full", title="Full (native fine-tuning)", module_class=FullModule, markers=("diff",), category="Full",
    uses_dropout=False, menu_order=35, recommended_dims=(1, 1 << 20),
    recommendation="network_dim and alpha are ignored; the file is as big as the layers it trains; can give the best "
                   "results but is the most sensitive to hyperparameters (use a fine-tuning learning rate)")
