"""LoHa (FedPara): ΔW = (w1a · w1b) ⊙ (w2a · w2b), so rank up to dim² from 4·dim vectors.

Keys and initialisation follow LyCORIS: ``hada_w1_a`` (out, dim), ``hada_w1_b`` (dim, in·k·k), likewise ``w2``;
w1_a ~ N(0, 0.1), w1_b and w2_b ~ N(0, 1), w2_a = 0 so ΔW starts at zero. With ``use_tucker`` a kxk conv keeps its
kernel in two cores ``hada_t1``/``hada_t2`` (dim, dim, k, k) ~ N(0, 0.1), and the w matrices become (dim, out) and
(dim, in). The layer runs with a merged weight built and freed per call (see ``merged_weight``).
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
    output_tokens,
)
from lycolab.networks.merged_weight import WORKSPACE, WeightGradient, compute_dtype, layer_backward, layer_forward
from lycolab.networks.registry import Algorithm

# Rows of ΔW are built this many elements at a time, so the products stay in cache instead of making full-size
# round trips to memory (the step is memory-bound on CPU); on a GPU whole matrices are fine.
CPU_CHUNK_ELEMENTS = 1 << 18
GPU_CHUNK_ELEMENTS = 1 << 26

PLAIN_FACTORS = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
TUCKER_FACTORS = ["hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b"]


@dataclass(frozen=True)
class LoHaOptions(LoRAOptions):
    """LoHa takes LoRA's options (``use_tucker``: kxk kernels in two cores); ``dropout`` is unused, as in LyCORIS."""


class LoHaModule(MergedWeightAdapter):
    algo = "loha"
    options_class = LoHaOptions
    reads_dora_scale = True

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0,
                 options: LoHaOptions | None = None, **option_values):
        super().__init__(lora_name, org_module, dim, alpha, multiplier, options, **option_values)
        out_dim, in_dim, kernel = layer_shape(org_module)
        self.tucker = bool(self.options.use_tucker and kernel and kernel != (1, 1))
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(self.dim, self.dim, *kernel))
            self.hada_w1_a = nn.Parameter(torch.empty(self.dim, out_dim))
            self.hada_w1_b = nn.Parameter(torch.empty(self.dim, in_dim))
            self.hada_t2 = nn.Parameter(torch.empty(self.dim, self.dim, *kernel))
            self.hada_w2_a = nn.Parameter(torch.empty(self.dim, out_dim))
            self.hada_w2_b = nn.Parameter(torch.empty(self.dim, in_dim))
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        else:
            flat_in = in_dim * math.prod(kernel)
            self.hada_w1_a = nn.Parameter(torch.empty(out_dim, self.dim))
            self.hada_w1_b = nn.Parameter(torch.empty(self.dim, flat_in))
            self.hada_w2_a = nn.Parameter(torch.empty(out_dim, self.dim))
            self.hada_w2_b = nn.Parameter(torch.empty(self.dim, flat_in))
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        if self.use_scalar:  # the scalar is the zero, so w2_a starts random (LyCORIS)
            nn.init.normal_(self.hada_w2_a, std=0.1)
        else:
            nn.init.zeros_(self.hada_w2_a)

    @classmethod
    def from_weights(cls, lora_name: str, org_module: nn.Module, weights: dict[str, torch.Tensor],
                     multiplier: float = 1.0) -> LoHaModule:
        tucker = "hada_t1" in weights
        module = cls(lora_name, org_module, weights["hada_w1_b"].shape[0], file_alpha(weights), multiplier,
                     use_tucker=tucker, **dora_options(weights, org_module))
        load_factors(module, weights, TUCKER_FACTORS if tucker else PLAIN_FACTORS)
        load_dora_scale(module, weights)
        module.check_shape()
        return module

    def own_factors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in (TUCKER_FACTORS if self.tucker else PLAIN_FACTORS)]

    def factor_delta(self, *factors: torch.Tensor) -> torch.Tensor:
        if self.tucker:
            t1, w1a, w1b, t2, w2a, w2b = factors
            first = torch.einsum("ij...,jr,ip->pr...", t1, w1b, w1a * self.scale)
            return first * torch.einsum("ij...,jr,ip->pr...", t2, w2b, w2a)
        w1a, w1b, w2a, w2b = factors
        return ((w1a * self.scale) @ w1b).mul(w2a @ w2b).reshape(self.weight_shape)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The cheaper of two exact forms: the merged weight, or the rank-dim² factored form when few tokens meet a
        big layer (the deep U-Net blocks at low resolution)."""
        if (self.tucker or self.use_scalar or getattr(self.org_module, "groups", 1) != 1
                or not self._factored_is_cheaper(x)):
            return super().adapted_forward(x)
        return self._factored_forward(x)

    def _factored_is_cheaper(self, x: torch.Tensor) -> bool:
        out_dim = self.weight_shape[0]
        flat_in = math.prod(self.weight_shape[1:])
        tokens = output_tokens(self.org_module, x)
        factored = 3 * tokens * self.dim**2 * (flat_in + out_dim)
        merged = 8 * self.dim * out_dim * flat_in + tokens * out_dim * flat_in
        return factored < merged

    def _factored_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.original_forward(x)
        row_factor = self.row_scale(x.device) * self.scale
        delta = FactoredHadamardFunction.apply(x, self.org_module, row_factor,
                                               self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
        return base + delta.to(base.dtype)

    def scale_delta(self, ratio: torch.Tensor) -> None:
        if self.use_scalar:
            self.scalar.mul_(ratio)  # LyCORIS' own rule
        else:
            self.hada_w1_a.mul_(ratio)  # LyCORIS' scalar, folded into hada_w1_a

    def scalar_key(self) -> str:
        return "hada_w1_a"

    def merged_weight(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
        """W + (a1 · w1b) ⊙ (w2a · w2b) with a1 = w1a · scale · row_scale, built chunk by chunk of rows."""
        if self.tucker or self.use_scalar:
            return super().merged_weight(weight, factors, row_scale, dtype)
        w1a, w1b, w2a, w2b = factors
        first_a = w1a * (row_scale * self.scale).to(w1a.dtype)[:, None]
        flat_weight = weight.reshape(weight.shape[0], -1)
        merged = WORKSPACE.take("merged", flat_weight.shape, dtype, weight.device)
        for rows, first, second in _row_products(first_a, w1b, w2a, w2b):
            _write_rows(merged[rows], flat_weight[rows], first, second)
        return merged.view(weight.shape)

    def merged_weight_backward(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                               dtype: torch.dtype, grad_merged: WeightGradient, need_merged: bool
                               ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Factor gradients of ΔW = (a1 · w1b) ⊙ (w2a · w2b) from ∂L/∂W, sharing each chunk's products with the
        rebuilt merged weight."""
        if self.tucker or self.use_scalar:
            return super().merged_weight_backward(weight, factors, row_scale, dtype, grad_merged, need_merged)
        w1a, w1b, w2a, w2b = factors
        row_factor = (row_scale * self.scale).to(w1a.dtype)[:, None]
        first_a = w1a * row_factor
        flat_weight = weight.reshape(weight.shape[0], -1)
        merged = WORKSPACE.take("merged", flat_weight.shape, dtype, weight.device) if need_merged else None
        grad_first_a, grad_w2a = torch.empty_like(w1a), torch.empty_like(w2a)
        grad_w1b, grad_w2b = torch.zeros_like(w1b), torch.zeros_like(w2b)
        for rows, first, second in _row_products(first_a, w1b, w2a, w2b):
            if merged is not None:
                _write_rows(merged[rows], flat_weight[rows], first, second)
            grad_rows = grad_merged.rows(rows).to(first.dtype)
            through_first = grad_rows * second  # ∂L/∂(a1 · w1b) for these rows
            torch.mm(through_first, w1b.t(), out=grad_first_a[rows])
            grad_w1b.addmm_(first_a[rows].t(), through_first)
            torch.mul(grad_rows, first, out=through_first)  # ∂L/∂(w2a · w2b)
            torch.mm(through_first, w2b.t(), out=grad_w2a[rows])
            grad_w2b.addmm_(w2a[rows].t(), through_first)
        grads = [grad_first_a * row_factor, grad_w1b, grad_w2a, grad_w2b]
        return (None if merged is None else merged.view(weight.shape)), grads


def _row_products(first_a: torch.Tensor, first_b: torch.Tensor, second_a: torch.Tensor, second_b: torch.Tensor):
    """Yield (rows, first_a[rows] · first_b, second_a[rows] · second_b) for cache-sized chunks of rows.

    The two product buffers are reused between chunks; consume them before asking for the next chunk.
    """
    height, width = first_a.shape[0], first_b.shape[1]
    budget = GPU_CHUNK_ELEMENTS if first_a.is_cuda else CPU_CHUNK_ELEMENTS
    step = max(1, min(height, budget // max(1, width)))
    first_buffer = first_a.new_empty(step, width)
    second_buffer = first_a.new_empty(step, width)
    for start in range(0, height, step):
        rows = slice(start, min(height, start + step))
        count = rows.stop - start
        first, second = first_buffer[:count], second_buffer[:count]
        torch.mm(first_a[rows], first_b, out=first)
        torch.mm(second_a[rows], second_b, out=second)
        yield rows, first, second


def _write_rows(target: torch.Tensor, weight_rows: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> None:
    """target = weight_rows + first ⊙ second, without a full-size temporary when the dtypes agree."""
    if target.dtype == weight_rows.dtype == first.dtype:
        torch.addcmul(weight_rows, first, second, out=target)
    else:
        target.copy_(first.mul(second).add_(weight_rows))


def hadamard_mix_and_basis(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                           row_factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with (w1a·w1b) ⊙ (w2a·w2b) = A · B.

    A[o, (i, j)] = w1a[o, i]·w2a[o, j] and B[(i, j), k] = w1b[i, k]·w2b[j, k]; ``row_factor`` (scale × multiplier
    × rank-dropout mask per output row) is folded into A.
    """
    out_dim, rank = w1a.shape
    mix = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_dim, rank * rank) * row_factor.to(w1a.dtype)[:, None]
    basis = (w1b[:, None, :] * w2b[None, :, :]).reshape(rank * rank, -1)
    return mix, basis


class FactoredHadamardFunction(torch.autograd.Function):
    """ΔW·x as B then A (dim² channels in between): cheap when few tokens meet a big layer.

    Plain autograd would keep A and B of every layer until backward; here only the input and the dim² activations
    are kept, and A, B are rebuilt from the factors in backward.
    """

    @staticmethod
    def forward(ctx, x, layer: nn.Module, row_factor: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            mix, basis = (tensor.to(dtype) for tensor in hadamard_mix_and_basis(*factors, row_factor))
            hidden = layer_forward(layer, x.to(dtype), _as_layer_weight(basis, layer), None)
            delta = _mix_channels(hidden, mix, layer)
        ctx.layer, ctx.dtype, ctx.input_dtype = layer, dtype, x.dtype
        ctx.save_for_backward(x, hidden, row_factor, *factors)
        return delta

    @staticmethod
    def backward(ctx, grad_delta):
        x, hidden, row_factor, *factors = ctx.saved_tensors
        layer, dtype = ctx.layer, ctx.dtype
        leaves = [factor.detach().requires_grad_() for factor in factors]
        with torch.enable_grad():
            mix, basis = hadamard_mix_and_basis(*leaves, row_factor)
        with torch.no_grad():
            grad_delta, mix_d, basis_d = grad_delta.to(dtype), mix.detach().to(dtype), basis.detach().to(dtype)
            if isinstance(layer, nn.Conv2d):
                grad_mix = torch.einsum("nohw,nchw->oc", grad_delta, hidden)
                grad_hidden = torch.einsum("nohw,oc->nchw", grad_delta, mix_d)
            else:
                grad_mix = grad_delta.reshape(-1, mix.shape[0]).t().mm(hidden.reshape(-1, mix.shape[1]))
                grad_hidden = grad_delta.matmul(mix_d)
            grad_x, grad_basis = layer_backward(layer, x.to(dtype), _as_layer_weight(basis_d, layer), grad_hidden,
                                                ctx.needs_input_grad[0], True)
        grads = torch.autograd.grad((mix, basis), leaves,
                                    (grad_mix.to(mix.dtype), grad_basis.reshape(basis.shape).to(basis.dtype)))
        return (None if grad_x is None else grad_x.to(ctx.input_dtype), None, None, *grads)


def _as_layer_weight(basis: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return basis.view(basis.shape[0], *layer.weight.shape[1:])
    return basis


def _mix_channels(hidden: torch.Tensor, mix: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(hidden, mix[:, :, None, None])
    return F.linear(hidden, mix)


ALGORITHM = Algorithm(name="loha", title="LoHa", module_class=LoHaModule, markers=("hada_w1_a", "hada_w1_b"),
                      category="LoHa", uses_dropout=False, menu_order=10, recommended_dims=(4, 32),
                      recommendation="network_dim ≤ 32 (LoHa's rank is dim², above 64 it exceeds the layers); "
                                     "alpha dim/2 or 1")
