"""LoHa (FedPara): ΔW = (w1a · w1b) ⊙ (w2a · w2b), so rank up to dim² from 4·dim vectors.

Keys and initialisation follow LyCORIS: ``hada_w1_a`` (out, dim), ``hada_w1_b`` (dim, in·k·k), likewise ``w2``;
w1_a ~ N(0, 0.1), w1_b and w2_b ~ N(0, 1), w2_a = 0 so ΔW starts at zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lycolab.networks.base import AdapterModule, layer_shape


class LoHaModule(AdapterModule):
    algo = "loha"

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0):
        super().__init__(lora_name, org_module, dim, alpha, multiplier)
        out_dim, in_dim, kernel = layer_shape(org_module)
        flat_in = in_dim * math.prod(kernel)
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, self.dim))
        self.hada_w1_b = nn.Parameter(torch.empty(self.dim, flat_in))
        self.hada_w2_a = nn.Parameter(torch.empty(out_dim, self.dim))
        self.hada_w2_b = nn.Parameter(torch.empty(self.dim, flat_in))
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)

    def delta_weight(self) -> torch.Tensor:
        product = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return product.reshape(self.org_module.weight.shape) * self.scale
