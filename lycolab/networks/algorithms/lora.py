"""LoRA and LoCon: ΔW = up · down, run as a low-rank side path so ΔW is never formed.

The same module serves LoRA (Linear and 1x1 conv) and LoCon (also kxk convs: ``lora_down`` takes the kernel,
``lora_up`` is 1x1), with kohya's keys ``lora_down.weight`` / ``lora_up.weight`` / ``alpha``. With ``use_tucker`` a
kxk conv is split LyCORIS-style into a 1x1 ``lora_down``, a kxk ``lora_mid`` (dim → dim) and a 1x1 ``lora_up``.

Dropouts follow sd-scripts' ``networks.lora``: ``dropout`` drops elements of the down projection's output,
``rank_dropout`` drops whole ranks per sample and rescales by 1/(1-p).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lycolab.networks.base import AdapterModule, file_alpha, layer_shape, new_parameter
from lycolab.networks.registry import AdapterOptions, Algorithm


@dataclass(frozen=True)
class LoRAOptions(AdapterOptions):
    use_tucker: bool = False  # kxk convs as 1x1 down, kxk mid, 1x1 up (LyCORIS' use_conv_cp / use_cp)


class LoRAModule(AdapterModule):
    algo = "lora"
    options_class = LoRAOptions

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0,
                 options: LoRAOptions | None = None, **option_values):
        super().__init__(lora_name, org_module, dim, alpha, multiplier, options, **option_values)
        out_dim, in_dim, kernel = layer_shape(org_module)
        self.tucker = bool(self.options.use_tucker and self.is_conv and kernel != (1, 1))
        if not self.is_conv:
            self.lora_down = nn.Linear(in_dim, self.dim, bias=False)
            self.lora_up = nn.Linear(self.dim, out_dim, bias=False)
        else:
            stride, padding, dilation = org_module.stride, org_module.padding, org_module.dilation
            if self.tucker:
                self.lora_down = nn.Conv2d(in_dim, self.dim, (1, 1), bias=False)
                self.lora_mid = nn.Conv2d(self.dim, self.dim, kernel, stride, padding, dilation, bias=False)
            else:
                self.lora_down = nn.Conv2d(in_dim, self.dim, kernel, stride, padding, dilation, bias=False)
            self.lora_up = nn.Conv2d(self.dim, out_dim, (1, 1), bias=False)
        # As kohya and LyCORIS: down (and mid) kaiming-uniform, up zero, so training starts from the base model.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.tucker:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @classmethod
    def from_weights(cls, lora_name: str, org_module: nn.Module, weights: dict[str, torch.Tensor],
                     multiplier: float = 1.0) -> LoRAModule:
        """Rebuild from a file's tensors; 2-D and 1x1 4-D forms are accepted for Linear and 1x1 conv alike."""
        tucker = "lora_mid.weight" in weights
        module = cls(lora_name, org_module, weights["lora_down.weight"].shape[0], file_alpha(weights), multiplier,
                     use_tucker=tucker)
        for key in ("lora_down.weight", "lora_up.weight") + (("lora_mid.weight",) if tucker else ()):
            target = module.get_parameter(key)
            tensor = weights[key]
            if tensor.numel() == target.numel() and tensor.dim() != target.dim():
                tensor = tensor.reshape(target.shape)  # a Linear LoRA on a 1x1 conv (SD 2 vs 1) or the reverse
            target.data = new_parameter(tensor).data
        module.check_shape()
        return module

    def delta_weight(self) -> torch.Tensor:
        up = self.lora_up.weight.flatten(1)
        if self.tucker:
            # ΔW[o, i, k] = Σ up[o, a] · mid[a, b, k] · down[b, i]
            delta = torch.einsum("oa,abhw,bi->oihw", up, self.lora_mid.weight, self.lora_down.weight.flatten(1))
            return delta * self.scale
        down = self.lora_down.weight.flatten(1)
        return (up @ down).reshape(self.weight_shape) * self.scale

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.original_forward(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_down.weight.dtype)  # under autocast the layers cast, and x stays shared with the base
        hidden = self.lora_down(x)
        if self.tucker:
            hidden = self.lora_mid(hidden)
        scale = self.multiplier * self.scale
        if self.training:
            if self.dropout:
                hidden = F.dropout(hidden, p=self.dropout)
            if self.rank_dropout:
                hidden = hidden * self._rank_mask(hidden)
                scale /= 1.0 - self.rank_dropout
        return base + (self.lora_up(hidden) * scale).to(base.dtype)

    def scale_delta(self, ratio: torch.Tensor) -> None:
        self.lora_up.weight.mul_(ratio)  # LyCORIS folds its scalar into lora_up

    def _rank_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """One keep/drop draw per (sample, rank), shaped to broadcast over tokens or pixels."""
        mask = (torch.rand(hidden.shape[0], self.dim, device=hidden.device) > self.rank_dropout).to(hidden.dtype)
        if self.is_conv:
            return mask[:, :, None, None]
        return mask.view(hidden.shape[0], *([1] * (hidden.dim() - 2)), self.dim)


ALGORITHM = Algorithm(
    name="lora", title="LoRA / LoCon", module_class=LoRAModule, markers=("lora_down.weight",), aliases=("locon",),
    category="LoCon_Lycoris", category_algo="locon", menu_order=0, recommended_dims=(8, 64),
    recommendation="network_dim 8–32 with alpha dim/2 or dim (or 1); conv_dim ≤ 32")
