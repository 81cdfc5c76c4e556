"""What every adapter shares: wrapping a frozen layer, ``scale = alpha / dim``, the multiplier, save/load keys.

The algorithms (LoRA, LoHa, ...) differ only in how they make ΔW and, for speed, how they run forward; everything
else lives here so adding an algorithm touches one file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdapterModule(nn.Module):
    """A trainable ΔW beside one frozen Linear/Conv2d, called instead of the layer's own forward."""

    algo = ""

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0):
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            kind = type(org_module).__name__
            raise TypeError(f"{lora_name}: only Linear and Conv2d layers can be adapted, got {kind}")
        self.lora_name = lora_name
        self.dim = int(dim)
        alpha = float(self.dim) if alpha is None or float(alpha) == 0 else float(alpha)
        self.scale = alpha / self.dim
        self.register_buffer("alpha", torch.tensor(alpha))
        self.multiplier = multiplier
        # Kept in a list so nn.Module does not register it: the network's parameters are the adapter's only.
        self._org = [org_module]
        self._org_forward = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.org_module, nn.Conv2d)

    def apply_to(self) -> None:
        """Route the original layer's calls through this adapter (the layer's weights are not touched)."""
        if self._org_forward is None:
            self._org_forward = self.org_module.forward
            self.org_module.forward = self.forward

    def restore(self) -> None:
        """Undo :meth:`apply_to`; the layer behaves exactly as before."""
        if self._org_forward is not None:
            self.org_module.forward = self._org_forward
            self._org_forward = None

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the original weight's shape, scale included, multiplier not."""
        raise NotImplementedError

    def frozen_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The original layer's operation with another weight (its bias, stride and padding kept)."""
        layer = self.org_module
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, layer.bias)
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Default path for algorithms whose ΔW has no cheap factored form: run with W + multiplier·ΔW."""
        weight = self.org_module.weight
        delta = self.delta_weight().to(weight.dtype) * self.multiplier
        return self.frozen_forward(x, weight + delta)


def layer_shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out features/channels, in features/channels, kernel size) of a Linear or Conv2d."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    return module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)
