"""GLoRA (generalised LoRA): ΔW = scale · (W·A + B), A = a1·a2 acting on the input, B = b1·b2 a LoRA beside it.

With scale = alpha / dim (× ``scalar`` with ``use_scalar``), the layer computes W·x + b + m·scale·(W·(A·x) + B·x),
which is run exactly as y = layer(x + m·scale·A·x) + m·scale·B·x: the frozen layer once, on a shifted input, plus
two rank-dim side paths; no weight-sized tensor is made. Keys, shapes and initialisation as LyCORIS 4.1.3:
``a2.weight`` (dim, in) and ``a1.weight`` (in, dim) — 1x1 convs on a conv layer —, ``b2.weight`` (dim, in[, k, k])
with the layer's kernel, stride and padding and ``b1.weight`` (out, dim[, 1, 1]), and ``alpha``. The four are made in
LyCORIS' order with PyTorch's default initialisation, then a1 and b1 are kaiming-uniform again and a2, b2 zero (so
ΔW starts at zero) — or, with ``use_scalar``, a2 and b2 kaiming-uniform and ``scalar`` zero; files then hold a2 and
b2 with the scalar folded in (LyCORIS' ``custom_state_dict``).

LyCORIS' default (merged, non-bypass) forward ignores ``dropout`` and ``rank_dropout`` for GLoRA; so does this. (Its
bypass mode applies them, with a rank-dropout mask that keeps a fraction p instead of 1 − p.) ``module_dropout``
acts. ``use_tucker`` is accepted and, as in LyCORIS 4.1.3 (whose condition for it can never hold), changes nothing;
files with a tucker core ``bm.weight`` are refused (LyCORIS cannot load them either). LyCORIS has no max-norm rule
for GLoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lycolab.networks.base import AdapterModule, file_alpha, layer_shape, new_parameter
from lycolab.networks.registry import AdapterOptions, Algorithm

FACTOR_KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


@dataclass(frozen=True)
class GLoRAOptions(AdapterOptions):
    use_tucker: bool = False  # accepted for LyCORIS' sake; builds nothing different (as in LyCORIS 4.1.3)
    use_scalar: bool = False  # a trainable scalar on ΔW starting at 0, with a2 and b2 random instead of zero


class GLoRAModule(AdapterModule):
    algo = "glora"
    options_class = GLoRAOptions
    has_max_norm_rule = False  # LyCORIS' GLoRAModule.apply_max_norm is the base no-op

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0,
                 options: GLoRAOptions | None = None, **option_values):
        super().__init__(lora_name, org_module, dim, alpha, multiplier, options, **option_values)
        if getattr(org_module, "groups", 1) != 1:
            raise ValueError(f"{lora_name}: GLoRA cannot adapt a grouped conv (W·A mixes all input channels)")
        out_dim, in_dim, kernel = layer_shape(org_module)
        rank = self.dim
        if self.is_conv:
            self.a2 = nn.Conv2d(in_dim, rank, 1, bias=False)
            self.a1 = nn.Conv2d(rank, in_dim, 1, bias=False)
            self.b2 = nn.Conv2d(in_dim, rank, kernel, org_module.stride, org_module.padding, org_module.dilation,
                                bias=False)
            self.b1 = nn.Conv2d(rank, out_dim, 1, bias=False)
        else:
            self.a2 = nn.Linear(in_dim, rank, bias=False)
            self.a1 = nn.Linear(rank, in_dim, bias=False)
            self.b2 = nn.Linear(in_dim, rank, bias=False)
            self.b1 = nn.Linear(rank, out_dim, bias=False)
        nn.init.kaiming_uniform_(self.a1.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.b1.weight, a=math.sqrt(5))
        if self.use_scalar:
            nn.init.kaiming_uniform_(self.a2.weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.b2.weight, a=math.sqrt(5))
            self.register_state_dict_post_hook(_fold_scalar_into_b2)  # the base folds it into a2 (scalar_key)
        else:
            nn.init.zeros_(self.a2.weight)
            nn.init.zeros_(self.b2.weight)

    @classmethod
    def from_weights(cls, lora_name: str, org_module: nn.Module, weights: dict[str, torch.Tensor],
                     multiplier: float = 1.0) -> GLoRAModule:
        """Shapes come from the file; a Linear's factors on a 1x1 conv (SD 2 vs SD 1) and the reverse are reshaped."""
        if "bm.weight" in weights:
            raise ValueError("a tucker core (bm.weight) is not supported (LyCORIS 4.1.3 neither makes nor loads one)")
        module = cls(lora_name, org_module, weights["a2.weight"].shape[0], file_alpha(weights), multiplier)
        for key in FACTOR_KEYS:
            target, tensor = module.get_parameter(key), weights[key]
            if tensor.numel() == target.numel() and tensor.dim() != target.dim():
                tensor = tensor.reshape(target.shape)
            target.data = new_parameter(tensor).data
        module.check_shape()
        return module

    def own_factors(self) -> list[torch.Tensor]:
        return [self.a1.weight, self.a2.weight, self.b1.weight, self.b2.weight]

    def factor_delta(self, a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        """scale · (W·a1·a2 + b1·b2): on a conv, a1·a2 mixes the input channels of every kernel tap."""
        weight = self.org_module.weight.detach().to(a1.dtype)
        through_a = torch.einsum("oi...,ir->or...", weight, a1.flatten(1))
        through_a = torch.einsum("or...,rj->oj...", through_a, a2.flatten(1))
        beside = (b1.flatten(1) @ b2.flatten(1)).view(self.weight_shape)
        return (beside + through_a) * self.scale

    def scalar_key(self) -> str:
        return "a2.weight"  # and b2.weight, by _fold_scalar_into_b2

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.multiplier * self.scale
        if self.use_scalar:
            scale = self.scalar * scale
        inner = x if torch.is_autocast_enabled(x.device.type) else x.to(self.a2.weight.dtype)
        shift = self.a1(self.a2(inner)) * scale
        output = self.original_forward(x + shift.to(x.dtype))
        return output + (self.b1(self.b2(inner)) * scale).to(output.dtype)

    def scale_delta(self, ratio: torch.Tensor) -> None:
        """LyCORIS has no max-norm rule for GLoRA: ΔW is left as it is."""


def _fold_scalar_into_b2(module: GLoRAModule, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: LyCORIS' GLoRA files hold b2 (like a2) times the scalar."""
    key = prefix + "b2.weight"
    with torch.no_grad():
        state_dict[key] = state_dict[key] * module.scalar.detach().to(state_dict[key].dtype)


ALGORITHM = Algorithm(
    name="glora", title="GLoRA", module_class=GLoRAModule, markers=("a1.weight", "b1.weight"), category="GLoRA",
    uses_dropout=False, menu_order=55, recommended_dims=(1, 64),
    recommendation="LyCORIS has studied no settings for GLoRA; LoRA's (network_dim ≤ 64, alpha 1 to dim/2) are a "
                   "reasonable start")
