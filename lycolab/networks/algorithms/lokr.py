"""LoKr: ΔW = w1 ⊗ w2 (Kronecker product), each side a full matrix or a low-rank pair, as LyCORIS defines it.

The layer's out/in sizes are split as out = a·c and in = b·d (:func:`factorization`, closest to ``factor`` or
balanced when -1). ``lokr_w1`` (a, b) is the small side, full unless ``decompose_both`` makes it ``lokr_w1_a`` ·
``lokr_w1_b``; ``lokr_w2`` (c, d[, k, k]) is the big side, a low-rank pair ``lokr_w2_a`` (c, dim) · ``lokr_w2_b``
(dim, d·k·k) unless dim is at least half its size (then full, like LyCORIS). ``use_tucker`` keeps a kxk kernel in a
core ``lokr_t2``. Initialisation as LyCORIS: w2_b (or full w2) zero, everything else kaiming-uniform; when both sides
are full, alpha is ignored (scale 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lycolab.networks.algorithms.lora import LoRAOptions
from lycolab.networks.base import (
    MergedWeightAdapter,
    dora_options,
    file_alpha,
    layer_shape,
    load_dora_scale,
    load_factors,
)
from lycolab.networks.registry import Algorithm, make_options


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m ≤ n: m = factor when it divides, else the most balanced split with m ≤ factor.

    Same results as LyCORIS, e.g. 128 → (8, 16) and 360 → (18, 20) for -1, 360 → (15, 24) for 16, 127 → (1, 127).
    """
    if factor > 0 and dimension % factor == 0:
        small, large = sorted((factor, dimension // factor))
        return small, large
    limit = dimension if factor < 0 else factor
    best = (1, dimension)
    candidate = 1
    while best[0] < best[1]:
        candidate += 1
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        best = (candidate, dimension // candidate)
    return tuple(sorted(best))


@dataclass(frozen=True)
class LoKrOptions(LoRAOptions):
    factor: int = -1  # split out/in sizes closest to this factor (-1: most balanced)
    decompose_both: bool = False  # the small side low-rank too
    full_matrix: bool = False  # the big side full, whatever dim
    unbalanced_factorization: bool = False  # swap the out-size split (big side first)


class LoKrModule(MergedWeightAdapter):
    algo = "lokr"
    options_class = LoKrOptions
    reads_dora_scale = True

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0,
                 options: LoKrOptions | None = None, **option_values):
        options = make_options(LoKrOptions, options, **option_values)
        out_dim, in_dim, kernel = layer_shape(org_module)
        out_small, out_large = factorization(out_dim, int(options.factor))
        if options.unbalanced_factorization:
            out_small, out_large = out_large, out_small
        in_small, in_large = factorization(in_dim, int(options.factor))
        w1_full = not (options.decompose_both and dim < max(out_small, in_small) / 2 and not options.full_matrix)
        w2_full = options.full_matrix or dim >= max(out_large, in_large) / 2
        if w1_full and w2_full:
            alpha = dim  # LyCORIS: nothing is low-rank, so no alpha scaling
        super().__init__(lora_name, org_module, dim, alpha, multiplier, options)
        self.tucker = bool(options.use_tucker and kernel and kernel != (1, 1) and not w2_full)
        rank = self.dim
        if w1_full:
            self.lokr_w1 = nn.Parameter(torch.empty(out_small, in_small))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_small, rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, in_small))
        if w2_full:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_large, in_large, *kernel))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(torch.empty(rank, rank, *kernel))
            self.lokr_w2_a = nn.Parameter(torch.empty(rank, out_large))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_large))
            nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_large, rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_large * math.prod(kernel)))
        # with use_scalar the scalar is the zero, so w2 (or w2_b) starts random; LyCORIS' order: w2 side, then w1
        if w2_full and self.use_scalar:
            nn.init.kaiming_uniform_(self.lokr_w2, a=math.sqrt(5))
        if not w2_full:
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            if self.use_scalar:
                nn.init.kaiming_uniform_(self.lokr_w2_b, a=math.sqrt(5))
        for name in ("lokr_w1",) if w1_full else ("lokr_w1_a", "lokr_w1_b"):
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))

    @classmethod
    def from_weights(cls, lora_name: str, org_module: nn.Module, weights: dict[str, torch.Tensor],
                     multiplier: float = 1.0) -> LoKrModule:
        """Shapes come from the file, so any factor / decompose / tucker choice of the writer loads."""
        if "lokr_w1_a" in weights:
            rank = weights["lokr_w1_a"].shape[1]
        elif "lokr_w2_a" in weights:
            rank = weights["lokr_w2_a"].shape[1] if "lokr_t2" not in weights else weights["lokr_w2_a"].shape[0]
        else:
            rank = 1
        names = [name for name in LOKR_KEYS if name in weights]
        alpha = file_alpha(weights)
        if "lokr_w1" in weights and "lokr_w2" in weights:
            alpha = rank  # both sides full: scale 1 whatever the file says, as LyCORIS
        module = cls.__new__(cls)
        MergedWeightAdapter.__init__(module, lora_name, org_module, rank, alpha, multiplier,
                                     **dora_options(weights, org_module))
        module.tucker = "lokr_t2" in weights
        load_factors(module, weights, names)
        load_dora_scale(module, weights)
        module.check_shape()
        return module

    def own_factors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in LOKR_KEYS if name in self._parameters]

    def kron_factors(self, *factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1 · scale, w2) with ΔW = w1 ⊗ w2: w1 is (a, b); w2 is (c, d) for a Linear, (c, d, k, k) for a conv."""
        named = dict(zip((name for name in LOKR_KEYS if name in self._parameters), factors, strict=True))
        w1 = named["lokr_w1"] if "lokr_w1" in named else named["lokr_w1_a"] @ named["lokr_w1_b"]
        if "lokr_w2" in named:
            w2 = named["lokr_w2"]
        elif self.tucker:
            w2 = torch.einsum("ij...,ip,jr->pr...", named["lokr_t2"], named["lokr_w2_a"], named["lokr_w2_b"])
        else:
            w2 = named["lokr_w2_a"] @ named["lokr_w2_b"]
        out_dim, in_dim = self.weight_shape[:2]
        w2 = w2.reshape(out_dim // w1.shape[0], in_dim // w1.shape[1], *self.weight_shape[2:])
        return w1 * self.scale, w2

    def factor_delta(self, *factors: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.kron_factors(*factors)
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1, w2.contiguous()).reshape(self.weight_shape)

    def scale_delta(self, ratio: torch.Tensor) -> None:
        factors = self.own_factors()  # with use_scalar too: LyCORIS scales LoKr's factors, never its scalar
        root = ratio ** (1 / len(factors))  # LyCORIS' "modules" count: 4 - use_w1 - use_w2 + tucker core
        for factor in factors:
            factor.mul_(root)

    def max_norm_delta(self) -> torch.Tensor:
        """LyCORIS measures LoKr's ΔW without its scalar (unlike LoCon's and LoHa's), before DoRA."""
        return self.factor_delta(*self.own_factors())

    def scalar_key(self) -> str:
        return "lokr_w1" if "lokr_w1" in self._parameters else "lokr_w1_a"

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x without forming ΔW: the input's channels split as (b, d) go through w2 (a grouped layer on d),
        then w1 mixes the b groups into a; exact, and far cheaper than the layer itself."""
        if getattr(self.org_module, "groups", 1) != 1:
            return super().adapted_forward(x)
        base = self.original_forward(x)
        w1, w2 = self.kron_factors(*self.own_factors())
        if self.use_scalar:
            w1 = w1 * self.scalar
        out_small, in_small = w1.shape
        layer = self.org_module
        x = x.to(w2.dtype)
        if self.is_conv:
            batch = x.shape[0]
            grouped = F.conv2d(x.reshape(batch * in_small, -1, *x.shape[2:]), w2, None, layer.stride, layer.padding,
                               layer.dilation)  # (N·b, c, H', W')
            grouped = grouped.reshape(batch, in_small, *grouped.shape[1:])
            delta = torch.einsum("ab,nbchw->nachw", w1, grouped).reshape(batch, -1, *grouped.shape[3:])
            row_view = (1, -1, 1, 1)
        else:
            grouped = F.linear(x.reshape(*x.shape[:-1], in_small, -1), w2)  # (..., b, c)
            delta = torch.einsum("ab,...bc->...ac", w1, grouped).reshape(*x.shape[:-1], -1)
            row_view = (-1,)
        delta = delta * self.row_scale(x.device).to(delta.dtype).view(row_view)
        return base + delta.to(base.dtype)


LOKR_KEYS = ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"]


ALGORITHM = Algorithm(name="lokr", title="LoKr", module_class=LoKrModule,
                      markers=("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"), category="LoKr", uses_dropout=False,
                      menu_order=20, recommended_dims=(4, 64),
                      recommendation="network_dim 8–32 with alpha 1 or dim/2; conv_dim ≤ 32")
