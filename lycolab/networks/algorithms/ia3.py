"""(IA)³: trained per-channel factors rescale a layer's output (or input), so ΔW = W ⊙ w along that axis.

y = (W·x) ⊙ (1 + m·w) + b on the output channels, or y = W·(x ⊙ (1 + m·w)) + b on the input channels with
``train_on_input``; either way one run of the layer plus an elementwise product, never a second weight. Keys as
LyCORIS 4.1.3 writes them: ``weight`` — (out,) for a Linear, (1, out, 1, 1) for a conv, the input's channels with
``train_on_input`` — starting at zero, and the buffer ``on_input`` (0 or 1). There is no ``alpha``: network_dim and
alpha mean nothing here, and ΔW has no scale. LyCORIS adapts Linear layers and, with conv_dim > 0, convs too.

LyCORIS' IA³ ignores ``dropout`` and ``rank_dropout``; ``module_dropout`` acts. Its ``apply_max_norm`` is the base
class's no-op, so max-norm leaves IA³ alone. Two LyCORIS 4.1.3 bugs are not reproduced: it cannot load IA³ files
at all (``make_module_from_state_dict`` takes ``weight`` while ``extract_state_dict`` passes ``weight`` and
``on_input``: a TypeError), and its loader would ignore ``on_input``; here ``on_input`` decides the axis. Its
kohya ``create_network`` does not forward ``train_on_input`` from ``network_args`` (only presets' per-layer options
reach it); ours takes it as an option like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lycolab.networks.base import AdapterModule, AdapterShapeError, layer_shape, new_parameter
from lycolab.networks.merged_weight import layer_forward
from lycolab.networks.registry import AdapterOptions, Algorithm

FILE_KEYS = frozenset({"weight", "on_input", "alpha"})


@dataclass(frozen=True)
class IA3Options(AdapterOptions):
    train_on_input: bool = False  # scale the input channels instead of the output's (LyCORIS' ia3 preset: MLP outs)


class IA3Module(AdapterModule):
    algo = "ia3"
    options_class = IA3Options
    has_max_norm_rule = False  # LyCORIS' IA3Module.apply_max_norm is the base no-op

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0,
                 options: IA3Options | None = None, **option_values):
        super().__init__(lora_name, org_module, dim, None, multiplier, options, **option_values)
        self.register_buffer("alpha", self.alpha, persistent=False)  # LyCORIS' IA³ files hold no alpha
        out_dim, in_dim, _ = layer_shape(org_module)
        if self.is_conv:
            in_dim = org_module.in_channels  # the input's channels, whatever the groups (as LyCORIS)
        self.scales_input = bool(self.options.train_on_input)
        channels = in_dim if self.scales_input else out_dim
        self.weight = nn.Parameter(torch.zeros((1, channels, 1, 1) if self.is_conv else (channels,)))
        self.register_buffer("on_input", torch.tensor(int(self.scales_input)))

    @classmethod
    def from_weights(cls, lora_name: str, org_module: nn.Module, weights: dict[str, torch.Tensor],
                     multiplier: float = 1.0) -> IA3Module:
        """``on_input`` from the file picks the axis; a vector of any layout with the right length is accepted."""
        module = cls(lora_name, org_module, 1, None, multiplier, train_on_input=bool(weights["on_input"]))
        tensor = weights["weight"]
        if tensor.numel() != module.weight.numel():
            side = "input" if module.scales_input else "output"
            raise AdapterShapeError(f"{lora_name}: the file's IA³ weight has {tensor.numel()} factors but the layer "
                                    f"has {module.weight.numel()} {side} channels; is the adapter for another base "
                                    "model (SD 1.x vs 2.x)?")
        module.weight = new_parameter(tensor.reshape(module.weight.shape))
        return module

    def own_factors(self) -> list[torch.Tensor]:
        return [self.weight]

    def factor_delta(self, gates: torch.Tensor) -> torch.Tensor:
        """W ⊙ w: each output row (or input column) of the weight times its factor."""
        weight = self.org_module.weight
        return weight.to(gates.dtype) * _along(gates, weight.dim(), 1 if self.scales_input else 0)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.org_module
        channel_axis = 1 if self.is_conv else -1
        if self.scales_input:
            gate = _along(self.weight, x.dim(), channel_axis) * self.multiplier
            return self.original_forward(x + (x * gate).to(x.dtype))
        output = layer_forward(layer, x, layer.weight, None)
        gate = _along(self.weight, output.dim(), channel_axis) * self.multiplier
        output = output + (output * gate).to(output.dtype)  # the delta alone is rounded, not 1 + m·w (fp16)
        if layer.bias is None:
            return output
        return output + layer.bias.to(output.dtype).reshape((-1, 1, 1) if self.is_conv else (-1,))

    def scale_delta(self, ratio: torch.Tensor) -> None:
        """LyCORIS has no max-norm rule for IA³: ΔW is left as it is."""


def _along(factors: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """The factors shaped to broadcast over a tensor of ``ndim`` dimensions along ``axis``."""
    shape = [1] * ndim
    shape[axis] = -1
    return factors.reshape(shape)


def is_ia3_module(parameters: dict[str, torch.Tensor]) -> bool:
    """A file's module is IA³ when it holds ``weight`` and ``on_input`` (LyCORIS' test), nothing of another
    algorithm, and ``weight`` is one vector of factors (a bare ``weight`` is too common a name to go by)."""
    weight = parameters.get("weight")
    return (weight is not None and "on_input" in parameters and set(parameters) <= FILE_KEYS
            and sum(size != 1 for size in weight.shape) <= 1)


ALGORITHM = Algorithm(
    name="ia3", title="(IA)³", module_class=IA3Module, markers=("on_input", "weight"), accepts=is_ia3_module,
    category="IA3", uses_dropout=False, menu_order=30, recommended_dims=(1, 1 << 20),
    recommendation="network_dim and alpha are ignored; a much higher learning rate (about 5e-3 to 1e-2); good at "
                   "style but hard to transfer to other models")
