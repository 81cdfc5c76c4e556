"""What every adapter shares: wrapping a frozen layer, ``scale = alpha / dim``, the multiplier, the dropouts.

The algorithms (``lycolab.networks.algorithms``) differ only in how they make ΔW and, for speed, how they run
forward; everything else lives here, and each describes itself in the registry, so adding one touches one file.
"""

from __future__ import annotations

import torch
from torch import nn

from lycolab.networks.merged_weight import WORKSPACE, WeightGradient, layer_forward, merged_weight_forward
from lycolab.networks.registry import AdapterOptions, make_options


class AdapterShapeError(ValueError):
    """Tensors that do not fit the layer they name (usually an adapter made for another base model)."""


class AdapterModule(nn.Module):
    """A trainable ΔW beside one frozen Linear/Conv2d, called instead of the layer's own forward.

    ``dropout`` / ``rank_dropout`` / ``module_dropout`` act only in training mode, with the meaning sd-scripts and
    LyCORIS give them (see each algorithm); ``module_dropout`` skips the whole adapter for a step.
    """

    algo = ""
    options_class: type[AdapterOptions] = AdapterOptions
    reads_dora_scale = False  # whether from_weights rebuilds DoRA's weight decomposition (``dora_scale``)

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0,
                 options: AdapterOptions | None = None, **option_values):
        """``options`` (this algorithm's ``options_class``) with ``option_values`` replacing fields by name."""
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            kind = type(org_module).__name__
            raise TypeError(f"{lora_name}: only Linear and Conv2d layers can be adapted, got {kind}")
        self.options = make_options(self.options_class, options, **option_values)
        self.lora_name = lora_name
        self.dim = int(dim)
        alpha = float(self.dim) if alpha is None or float(alpha) == 0 else float(alpha)
        self.scale = alpha / self.dim
        self.register_buffer("alpha", torch.tensor(alpha))
        self.multiplier = multiplier
        self.dropout = float(self.options.dropout or 0.0)
        self.rank_dropout = float(self.options.rank_dropout or 0.0)
        self.module_dropout = float(self.options.module_dropout or 0.0)
        self.rank_dropout_scale = bool(self.options.rank_dropout_scale)
        # Kept in a list so nn.Module does not register it: the network's parameters are the adapter's only.
        self._org = [org_module]
        self._org_forward = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.org_module, nn.Conv2d)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.org_module.weight.shape)

    def apply_to(self) -> None:
        """Route the original layer's calls through this adapter (the layer's weights are not touched)."""
        if self._org_forward is None:
            self._org_forward = self.org_module.forward
            self.org_module.forward = self.forward

    def restore(self) -> None:
        """Undo :meth:`apply_to`; the layer behaves exactly as before."""
        if self._org_forward is not None:
            if getattr(self._org_forward, "__func__", None) is type(self.org_module).forward:
                del self.org_module.forward  # the class's own forward again, no instance attribute left behind
            else:
                self.org_module.forward = self._org_forward  # another wrapper was there first: give it back
            self._org_forward = None

    def original_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._org_forward(x) if self._org_forward is not None else self.org_module.forward(x)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the original weight's shape, scale included, multiplier not."""
        raise NotImplementedError

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scale_delta(self, ratio: torch.Tensor) -> None:
        """Multiply ΔW by ``ratio`` in place, in the parameter LyCORIS' max-norm rule scales for this algorithm."""
        raise NotImplementedError(f"{self.lora_name}: no max-norm rule for {type(self).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return self.original_forward(x)
        return self.adapted_forward(x)

    def frozen_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The original layer's operation with another weight (its bias, stride and padding kept)."""
        return layer_forward(self.org_module, x, weight, self.org_module.bias)

    def check_shape(self) -> None:
        """Raise :class:`AdapterShapeError` unless ΔW has the layer's weight shape."""
        with torch.no_grad():
            try:
                shape = tuple(self.delta_weight().shape)
            except RuntimeError as error:
                shape = f"unbuildable ({str(error).splitlines()[0]})"
        if shape != self.weight_shape:
            raise AdapterShapeError(f"{self.lora_name}: ΔW from the file is {shape} but the layer is "
                                    f"{self.weight_shape}; is the adapter for another base model (SD 1.x vs 2.x)?")


class MergedWeightAdapter(AdapterModule):
    """An algorithm built from factors (LoHa, LoKr) whose generic forward runs the layer with W + m·ΔW.

    Subclasses define :meth:`factors` (their parameters, in a fixed order) and :meth:`make_delta` (ΔW from those
    factors, scale included); they may override the two merge methods with faster equivalents, or
    :meth:`adapted_forward` with a factored form where one is cheaper. Rank dropout follows
    LyCORIS: whole rows (output channels) of ΔW are dropped, rescaled by the kept fraction if
    ``rank_dropout_scale``.
    """

    def factors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def make_delta(self, *factors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        return self.make_delta(*self.factors())

    def row_scale(self, device: torch.device) -> torch.Tensor:
        """Per output row: the multiplier, times the rank-dropout mask while training."""
        rows = self.weight_shape[0]
        scale = torch.full((rows,), float(self.multiplier), device=device)
        if self.training and self.rank_dropout:
            mask = (torch.rand(rows, device=device) > self.rank_dropout).float()
            if self.rank_dropout_scale:
                mask /= mask.mean().clamp(min=1.0 / rows)
            scale *= mask
        return scale

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return merged_weight_forward(x, self.org_module, self, self.factors(), self.row_scale(x.device))

    def merged_weight(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
        delta = scale_rows(self.make_delta(*factors), row_scale)
        merged = torch.add(delta, weight, out=WORKSPACE.take("merged", weight.shape, delta.dtype, weight.device))
        return merged.to(dtype)

    def merged_weight_backward(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                               dtype: torch.dtype, grad_merged: WeightGradient, need_merged: bool
                               ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Rebuild ΔW under autograd and pull the weight gradient back through that small graph only."""
        leaves = [factor.detach().requires_grad_() for factor in factors]
        with torch.enable_grad():
            delta = self.make_delta(*leaves)
        grads = torch.autograd.grad(delta, leaves, scale_rows(grad_merged.full().to(delta.dtype), row_scale))
        merged = None
        if need_merged:
            delta = scale_rows(delta.detach(), row_scale)
            merged = torch.add(delta, weight, out=WORKSPACE.take("merged", weight.shape, delta.dtype, weight.device))
        return (None if merged is None else merged.to(dtype)), list(grads)


def scale_rows(tensor: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """``tensor`` with row i multiplied by ``row_scale[i]`` (a new tensor)."""
    return tensor * row_scale.to(tensor.dtype).view(-1, *([1] * (tensor.dim() - 1)))


def layer_shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out features/channels, in features/channels, kernel size) of a Linear or Conv2d."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    return module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)


def output_tokens(layer: nn.Module, x: torch.Tensor) -> int:
    """How many output positions the layer computes for ``x``: tokens for a Linear, N·H'·W' for a conv."""
    if isinstance(layer, nn.Linear):
        return x.numel() // layer.in_features
    height, width = x.shape[-2:]
    sizes = [(size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1 for size, pad, dil, kernel, stride in
             zip((height, width), layer.padding, layer.dilation, layer.kernel_size, layer.stride, strict=True)]
    return (x.numel() // (layer.in_channels * height * width)) * sizes[0] * sizes[1]


def new_parameter(tensor: torch.Tensor) -> nn.Parameter:
    """A float32 trainable copy of a tensor read from a file (files are often fp16/bf16)."""
    return nn.Parameter(tensor.detach().to(torch.float32).clone())


def file_alpha(weights: dict[str, torch.Tensor]) -> float | None:
    """A module's ``alpha`` from a file; absent means alpha = dim (scale 1), as in sd-scripts and LyCORIS."""
    alpha = weights.get("alpha")
    return None if alpha is None else float(alpha)


def load_factors(module: nn.Module, weights: dict[str, torch.Tensor], names: list[str]) -> None:
    """Replace the module's parameters ``names`` by the file's tensors (shapes come from the file)."""
    for name in names:
        setattr(module, name, new_parameter(weights[name]))
