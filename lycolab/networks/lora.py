"""LoRA and LoCon: ΔW = up · down, run as a low-rank side path so ΔW is never formed.

The same module serves LoRA (Linear and 1x1 conv) and LoCon (also kxk convs: ``lora_down`` takes the kernel,
``lora_up`` is 1x1), with kohya's keys ``lora_down.weight`` / ``lora_up.weight`` / ``alpha``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lycolab.networks.base import AdapterModule, layer_shape


class LoRAModule(AdapterModule):
    algo = "lora"

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0):
        super().__init__(lora_name, org_module, dim, alpha, multiplier)
        out_dim, in_dim, kernel = layer_shape(org_module)
        if self.is_conv:
            self.lora_down = nn.Conv2d(
                in_dim, self.dim, kernel, org_module.stride, org_module.padding, org_module.dilation, bias=False
            )
            self.lora_up = nn.Conv2d(self.dim, out_dim, (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(in_dim, self.dim, bias=False)
            self.lora_up = nn.Linear(self.dim, out_dim, bias=False)
        # As kohya and LyCORIS: down random (kaiming uniform), up zero, so training starts from the base model.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def delta_weight(self) -> torch.Tensor:
        up = self.lora_up.weight.flatten(1)
        down = self.lora_down.weight.flatten(1)
        return (up @ down).reshape(self.org_module.weight.shape) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._org_forward(x)
        side = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return base + (side * (self.multiplier * self.scale)).to(base.dtype)
