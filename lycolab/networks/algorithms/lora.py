"""LoRA and LoCon: ΔW = up · down, run as a low-rank side path so ΔW is never formed.

The same module serves LoRA (Linear and 1x1 conv) and LoCon (also kxk convs: ``lora_down`` takes the kernel,
``lora_up`` is 1x1), with kohya's keys ``lora_down.weight`` / ``lora_up.weight`` / ``alpha``. With ``use_tucker`` a
kxk conv is split LyCORIS-style into a 1x1 ``lora_down``, a kxk ``lora_mid`` (dim → dim) and a 1x1 ``lora_up``.

Dropouts follow sd-scripts' ``networks.lora``: ``dropout`` drops elements of the down projection's output,
``rank_dropout`` drops whole ranks per sample and rescales by 1/(1-p). With DoRA (``dora_wd``) the layer runs with
the decomposed weight instead (``lycolab.networks.dora``) and, as in LyCORIS, ``dropout`` is not used and
``rank_dropout`` drops whole rows of ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lycolab.networks.base import AdapterModule, dora_options, file_alpha, layer_shape, load_dora_scale, new_parameter
from lycolab.networks.low_rank_function import fused_dtype, fused_forward_applies, low_rank_forward
from lycolab.networks.merged_weight import WORKSPACE, WeightGradient
from lycolab.networks.registry import AdapterOptions, Algorithm


@dataclass(frozen=True)
class LoRAOptions(AdapterOptions):
    """LyCORIS' options for LoCon, LoHa and LoKr (the latter two inherit them); see ``AdapterModule`` for
    ``dora_wd``, ``wd_on_output``, ``use_scalar`` and ``rs_lora``."""

    use_tucker: bool = False  # kxk convs as 1x1 down, kxk mid, 1x1 up (LyCORIS' use_conv_cp / use_cp)
    dora_wd: bool = False  # DoRA: a trained magnitude per row (or column) times W + ΔW's direction
    wd_on_output: bool = True  # DoRA's norms per output row (else per input column)
    use_scalar: bool = False  # a trained scalar on ΔW, starting at 0 (up then starts random, not zero)
    rs_lora: bool = False  # rank-stabilised scale alpha / √dim


class LoRAModule(AdapterModule):
    algo = "lora"
    options_class = LoRAOptions
    reads_dora_scale = True

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
        # As kohya and LyCORIS: down (and mid) kaiming-uniform, up zero, so training starts from the base model;
        # with use_scalar the scalar is the zero and up starts random (LyCORIS' order: down, up, mid).
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.use_scalar:
            nn.init.kaiming_uniform_(self.lora_up.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_up.weight)
        if self.tucker:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))

    @classmethod
    def from_weights(cls, lora_name: str, org_module: nn.Module, weights: dict[str, torch.Tensor],
                     multiplier: float = 1.0) -> LoRAModule:
        """Rebuild from a file's tensors; 2-D and 1x1 4-D forms are accepted for Linear and 1x1 conv alike."""
        tucker = "lora_mid.weight" in weights
        module = cls(lora_name, org_module, weights["lora_down.weight"].shape[0], file_alpha(weights), multiplier,
                     use_tucker=tucker, **dora_options(weights, org_module))
        for key in ("lora_down.weight", "lora_up.weight") + (("lora_mid.weight",) if tucker else ()):
            target = module.get_parameter(key)
            tensor = weights[key]
            if tensor.numel() == target.numel() and tensor.dim() != target.dim():
                tensor = tensor.reshape(target.shape)  # a Linear LoRA on a 1x1 conv (SD 2 vs 1) or the reverse
            target.data = new_parameter(tensor).data
        load_dora_scale(module, weights)
        module.check_shape()
        return module

    def own_factors(self) -> list[torch.Tensor]:
        mid = [self.lora_mid.weight] if self.tucker else []
        return [self.lora_down.weight, self.lora_up.weight, *mid]

    def factor_delta(self, down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
        up = up.flatten(1)
        if mid is not None:
            # ΔW[o, i, k] = Σ up[o, a] · mid[a, b, k] · down[b, i]
            return torch.einsum("oa,abhw,bi->oihw", up, mid, down.flatten(1)) * self.scale
        return (up @ down.flatten(1)).reshape(self.weight_shape) * self.scale

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_fused():
            dtype = fused_dtype(x, self.org_module, self.lora_down.weight)
            if dtype is not None:
                return low_rank_forward(x, self.org_module, self.lora_down.weight, self.lora_up.weight,
                                        float(self.multiplier) * self.scale, dtype)
        return self._modules_forward(x)

    def _runs_fused(self) -> bool:
        """The one-op path (``low_rank_function``) where it is exact: plain LoRA/LoCon on a frozen layer called
        as a method (another wrapper in front keeps its own forward), with no dropout drawn in this call."""
        drops = self.training and (self.dropout or self.rank_dropout)
        return not (self.tucker or self.use_scalar or drops or self.wraps_another_wrapper) \
            and fused_forward_applies(self.org_module)

    def _modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain form: the layer, then up(down(x)) scaled, as sd-scripts and LyCORIS run it."""
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
        delta = self.lora_up(hidden) * scale
        if self.use_scalar:
            delta = delta * self.scalar
        return base + delta.to(base.dtype)

    def scale_delta(self, ratio: torch.Tensor) -> None:
        if self.use_scalar:
            self.scalar.mul_(ratio)  # LyCORIS' own rule
        else:
            self.lora_up.weight.mul_(ratio)  # LyCORIS folds its scalar into lora_up

    def scalar_key(self) -> str:
        return "lora_up.weight"

    def merged_weight(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
        """W + row_scale · up · down · scale in one ``addmm`` into the reused buffer (DoRA's V)."""
        if self.tucker:
            return super().merged_weight(weight, factors, row_scale, dtype)
        down, up, scaled_up = self._scaled_up(factors, row_scale)
        flat_weight = weight.reshape(weight.shape[0], -1).to(up.dtype)
        merged = WORKSPACE.take("merged", flat_weight.shape, up.dtype, weight.device)
        torch.addmm(flat_weight, scaled_up, down, out=merged)
        return merged.view(weight.shape).to(dtype)

    def merged_weight_backward(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                               dtype: torch.dtype, grad_merged: WeightGradient, need_merged: bool
                               ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """∂L/∂down = (r·up)ᵀ·G, ∂L/∂up = r·(G·downᵀ), ∂L/∂scalar = Σ (G·downᵀ) ⊙ up ⊙ r₀ (r = r₀ · scalar)."""
        if self.tucker:
            return super().merged_weight_backward(weight, factors, row_scale, dtype, grad_merged, need_merged)
        down, up, scaled_up = self._scaled_up(factors, row_scale)
        grad = grad_merged.full().reshape(up.shape[0], -1).to(up.dtype)
        through_down = grad @ down.t()  # (out, dim)
        row_factor = (row_scale * self.scale).to(up.dtype)[:, None]
        grads = [(scaled_up.t() @ grad).view(factors[0].shape),
                 (through_down * row_factor * (factors[2] if self.use_scalar else 1)).view(factors[1].shape)]
        if self.use_scalar:
            grads.append((through_down * up * row_factor).sum().view(factors[2].shape))
        merged = self.merged_weight(weight, factors, row_scale, dtype) if need_merged else None
        return merged, grads

    def _scaled_up(self, factors: list[torch.Tensor], row_scale: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(down, up as matrices, up · row_scale · scale · scalar)."""
        down, up = factors[0].flatten(1), factors[1].flatten(1)
        row_factor = (row_scale * self.scale).to(up.dtype)
        if self.use_scalar:
            row_factor = row_factor * factors[2]
        return down, up, up * row_factor[:, None]

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
