"""LyCORIS' ``train_norm``: a trainable offset on the scale and shift of LayerNorm / GroupNorm layers.

With ``train_norm`` LyCORIS gives every LayerNorm/GroupNorm inside the preset's blocks a ``NormModule``: ``w_norm``
and ``b_norm`` (zeros, one per channel, no ``alpha``) added to the layer's weight and bias, times the multiplier —
the layer runs as ``norm(x; W + m·w_norm, B + m·b_norm)``, which is LyCORIS' ``base + norm(x)·Δw + Δb`` in one op.
It follows the network's ``rank_dropout`` and ``module_dropout`` as LyCORIS does: ``module_dropout`` skips the
offset for a step; with ``rank_dropout`` p, an entry's offset is *kept* with probability p (LyCORIS 4.1.3 draws
``rand < p`` and keeps those, the reverse of the usual meaning; the same draw is used here so runs match).

These are not :class:`~lycolab.networks.base.AdapterModule` s (there is no ΔW of a Linear/Conv2d to speak of):
LyCORIS' max-norm skips them, and so does ours, which only sees ``network.adapters``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lycolab.networks.base import AdapterShapeError, LayerWrapper, new_parameter

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm)
MARKER = "w_norm"


def is_trainable_norm(module: nn.Module) -> bool:
    """A LayerNorm/GroupNorm with a learnt scale and shift (one channel axis), the layers NormModule adapts."""
    if not isinstance(module, NORM_LAYERS) or module.weight is None or module.bias is None:
        return False
    return not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) == 1


class NormAdapter(LayerWrapper):
    """``w_norm``/``b_norm`` beside one frozen LayerNorm/GroupNorm, called instead of its forward."""

    algo = "norm"

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0):
        super().__init__()
        if not is_trainable_norm(org_module):
            raise TypeError(f"{lora_name}: train_norm adapts affine LayerNorm/GroupNorm layers, got "
                            f"{type(org_module).__name__}")
        self.lora_name = lora_name
        self.multiplier = multiplier
        self.rank_dropout = float(rank_dropout or 0.0)
        self.module_dropout = float(module_dropout or 0.0)
        channels = org_module.weight.numel()
        self.w_norm = nn.Parameter(torch.zeros(channels))
        self.b_norm = nn.Parameter(torch.zeros(channels))
        self._hold(org_module)

    @classmethod
    def from_weights(cls, lora_name: str, org_module: nn.Module, weights: dict[str, torch.Tensor],
                     multiplier: float = 1.0) -> NormAdapter:
        module = cls(lora_name, org_module, multiplier)
        for name in ("w_norm", "b_norm"):
            if name not in weights:
                continue  # LyCORIS writes b_norm for every layer with a bias; without it the shift stays
            tensor = weights[name].reshape(-1)
            if tensor.shape != module.w_norm.shape:
                raise AdapterShapeError(f"{lora_name}: {name} from the file has {tensor.numel()} entries but the "
                                        f"layer has {module.w_norm.numel()} channels; is the adapter for another "
                                        "base model?")
            setattr(module, name, new_parameter(tensor))
        return module

    def offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δweight, Δbias) this step: m·w_norm, m·b_norm, with LyCORIS' rank-dropout draw while training."""
        weight, bias = self.w_norm * self.multiplier, self.b_norm * self.multiplier
        if self.training and self.rank_dropout:
            kept = (torch.rand(weight.shape[0], device=weight.device) < self.rank_dropout).to(weight.dtype)
            weight, bias = weight * kept, bias * kept
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.org_module
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return self.original_forward(x)
        delta_weight, delta_bias = self.offsets()
        weight = layer.weight.to(delta_weight.dtype) + delta_weight
        bias = layer.bias.to(delta_bias.dtype) + delta_bias
        if not torch.is_autocast_enabled(x.device.type):
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        if isinstance(layer, nn.GroupNorm):
            return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
