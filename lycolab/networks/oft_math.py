"""What diag-OFT and BOFT share: skew blocks → orthogonal blocks (Cayley), a chain of block-diagonal stages applied to
a layer's output channels, and the adapter module built on them.

OFT keeps the frozen weight and rotates it on the output side: W' = D · T · W, T a product of block-diagonal
matrices on the output channels (rows of W; one stage for diag-OFT, a butterfly of stages for BOFT) and D an
optional per-channel ``rescale``. LyCORIS builds W' under autograd and runs the layer twice (W ∗ x and (W' − W) ∗ x),
keeping full-size tensors for backward. Here each call takes the cheaper of two exact forms:

* T on the layer's output: for a Linear or an ungrouped conv T · (W ∗ x) = (T · W) ∗ x, so the layer runs once with
  its own weight, T costs a b×b product per block of b channels per position, and backward needs only the layer's
  input gradient (what the frozen base computes anyway) and block-sized products — never a full-size weight
  gradient. Only the layer's output (before T) is kept; the stages are recomputed from it.
* W' built and freed per call (:class:`~lycolab.networks.merged_weight.MergedWeightFunction`), when the weight is
  smaller than the output (many tokens through a narrow Linear, a butterfly of many stages) or the conv is grouped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lycolab.networks.base import AdapterModule, file_alpha, load_factors, output_tokens
from lycolab.networks.merged_weight import WeightGradient, layer_forward, merged_weight_forward
from lycolab.networks.registry import AdapterOptions

CAYLEY_EPSILON = 1e-8  # LyCORIS adds this to ‖Q‖ before capping it
# The forward-path cost model (see OrthogonalAdapter._rotates_output), measured on CPU: how many times a stage moves
# its operand (forward, recompute, backward), how much dearer a Linear's transposed output is to move, and how many
# multiply-adds of a large matrix product cost as much as moving one element.
OUTPUT_PASSES = 8
LINEAR_OUTPUT_COST = 3
PASS_FLOPS = 16


def cayley(blocks: torch.Tensor, norm_limit: float) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ for every b×b block B, so each R is orthogonal.

    With ``norm_limit`` > 0, Q is first scaled down so that ‖Q‖ (over all blocks at once, ε = 1e-8 added) is at most
    the limit, as LyCORIS' ``constraint`` does; ``torch.where`` keeps that rule free of a host sync on a GPU. The
    two factors commute, so R = (I − Q)⁻¹(I + Q), which a solve gives more accurately than an explicit inverse
    (made row-major, like LyCORIS' product, so that a dropout mask drawn on it lands on the same elements).
    """
    skew = blocks - blocks.transpose(-1, -2)
    if norm_limit > 0:
        norm = torch.linalg.vector_norm(skew) + CAYLEY_EPSILON
        skew = skew * torch.where(norm > norm_limit, norm_limit / norm, torch.ones_like(norm))
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return torch.linalg.solve(eye - skew, eye + skew).contiguous()


def toward_identity(matrices: torch.Tensor, multiplier: float) -> torch.Tensor:
    """m · M + (1 − m) · I: the multiplier moves each block between the identity (0) and the learned one (1)."""
    if multiplier == 1:
        return matrices
    eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
    return matrices * multiplier + (1 - multiplier) * eye


@dataclass(frozen=True)
class StagePlan:
    """Where each stage's blocks come from: the channel order (a gather index) that makes stage i's blocks contiguous,
    given the order the previous stage left, and the gather that restores the layer's order at the end; None where
    the order is already right. A butterfly's un-pairing after one stage and pairing before the next are thus one
    gather, not two copies. The inverses (for backward) undo each gather: every one is a permutation."""

    gathers: tuple[torch.Tensor | None, ...]
    inverse_gathers: tuple[torch.Tensor | None, ...]
    final: torch.Tensor | None
    inverse_final: torch.Tensor | None


@functools.lru_cache(maxsize=256)
def stage_plan(channels: int, half_strides: tuple[int, ...], device: torch.device) -> StagePlan:
    """The :class:`StagePlan` for butterfly ``half_strides`` (0: contiguous blocks), paired as LyCORIS' BOFT pairs
    channels: within each run of 2·k channels, (c, 2, k) → (c, k, 2)."""
    identity = list(range(channels))
    order = identity  # which channel of the layer each position holds now
    gathers = []
    for half_stride in half_strides:
        wanted = identity
        if half_stride:
            wanted = torch.arange(channels).view(-1, 2, half_stride).transpose(1, 2).reshape(-1).tolist()
        gathers.append(_positions(order, wanted))
        order = wanted
    final = _positions(order, identity)

    def as_index(gather: list[int]) -> torch.Tensor | None:
        return None if gather == identity else torch.tensor(gather, device=device)

    return StagePlan(tuple(as_index(gather) for gather in gathers),
                     tuple(as_index(_positions(gather, identity)) for gather in gathers),
                     as_index(final), as_index(_positions(final, identity)))


def _positions(order: list[int], wanted: list[int]) -> list[int]:
    """The gather index that turns a tensor whose channels are in ``order`` into one in ``wanted`` order."""
    position = {channel: index for index, channel in enumerate(order)}
    return [position[channel] for channel in wanted]


def _reorder(values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``values`` (T, C) or (L, C, R) with its channels gathered by ``index`` (a contiguous copy either way)."""
    return values.contiguous() if index is None else values.index_select(1, index)


def run_stages(values: torch.Tensor, stages: Sequence[torch.Tensor], plan: StagePlan, keep_inputs: bool = False
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(T_last ⋯ T_1 applied to the channels of ``values``, each stage's blocks if ``keep_inputs``).

    ``values`` is (T, C), channels last, or (L, C, R) (see :func:`channel_layout`). Stage i's blocks M (n, b, b) act
    as block_out = M · block_in in the channel order of ``plan``: per block, one matrix product over all positions.
    Differentiable: under autograd this is the plain formula; :func:`run_stages_backward` gives its gradients.
    """
    current, kept = values, []
    for matrices, gather in zip(stages, plan.gathers, strict=True):
        count, size, _ = matrices.shape
        gathered = _reorder(current, gather)
        matrices = matrices.to(gathered.dtype)
        if gathered.dim() == 2:  # rows of blocks: (n, T, b) as a strided view, and back in contiguous b-runs
            blocks = gathered.view(gathered.shape[0], count, size).transpose(0, 1)
            current = torch.bmm(blocks, matrices.transpose(1, 2)).transpose(0, 1).reshape(gathered.shape)
        else:
            blocks = gathered.view(gathered.shape[0], count, size, -1)
            current = torch.matmul(matrices, blocks).view(gathered.shape)
        if keep_inputs:
            kept.append(blocks)
    return _reorder(current, plan.final), kept


def run_stages_backward(grad: torch.Tensor, stages: Sequence[torch.Tensor], plan: StagePlan,
                        inputs: list[torch.Tensor], need_values: bool
                        ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(∂L/∂values, ∂L/∂stages) of :func:`run_stages` given ∂L/∂output (same layout) and the kept stage inputs."""
    current = _reorder(grad, plan.inverse_final)
    stage_grads = []
    for index in reversed(range(len(stages))):
        blocks = inputs[index]
        matrices = stages[index].to(current.dtype)
        if current.dim() == 2:  # out = blocks · Mᵀ per block
            block_grad = current.view(current.shape[0], *matrices.shape[:2]).transpose(0, 1)
            stage_grads.append(torch.bmm(block_grad.transpose(1, 2), blocks).to(stages[index].dtype))
        else:  # out = M · blocks per block
            block_grad = current.view(blocks.shape)
            stage_grads.append(torch.matmul(block_grad, blocks.transpose(-1, -2)).sum(0).to(stages[index].dtype))
        if index == 0 and not need_values:
            break
        if current.dim() == 2:
            current = torch.bmm(block_grad, matrices).transpose(0, 1).reshape(current.shape)
        else:
            current = torch.matmul(matrices.transpose(-1, -2), block_grad).view(current.shape)
        current = _reorder(current, plan.inverse_gathers[index])
    return (current if need_values else None), stage_grads[::-1]


def channel_layout(values: torch.Tensor, channel_dim: int, stages: int = 1) -> torch.Tensor:
    """``values`` as (L, C, R): a conv output (N, C, H·W), a weight (1, C, in·k·k). A Linear's output (channels last)
    stays (T, C) for one stage (each block is then one product over the tokens, read in place); for a butterfly it
    becomes (1, C, T), transposed once, since each stage's channel gather then moves whole rows."""
    channel_dim %= values.dim()
    if channel_dim == values.dim() - 1:
        rows = values.reshape(-1, values.shape[-1])
        return rows if stages == 1 else rows.t().unsqueeze(0)
    return values.reshape(math.prod(values.shape[:channel_dim]), values.shape[channel_dim], -1)


def restore_layout(output: torch.Tensor, shape: torch.Size, channel_dim: int) -> torch.Tensor:
    """The inverse of :func:`channel_layout` for a result (made contiguous in the original layout)."""
    if channel_dim % len(shape) == len(shape) - 1 and output.dim() == 3:
        return output[0].t().contiguous().view(shape)
    return output.view(shape)


def _per_channel(vector: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over ``layout``."""
    vector = vector.reshape(-1).to(layout.dtype)
    return vector if layout.dim() == 2 else vector.view(1, -1, 1)


def transform_channels_plain(values: torch.Tensor, stages: Sequence[torch.Tensor], half_strides: Sequence[int],
                             rescale: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """D · T_last ⋯ T_1 along ``channel_dim`` of ``values`` (see :func:`run_stages`), with plain autograd."""
    plan = stage_plan(values.shape[channel_dim], tuple(half_strides), values.device)
    output, _ = run_stages(channel_layout(values, channel_dim, len(stages)), stages, plan)
    if rescale is not None:
        output = output * _per_channel(rescale, output)
    return restore_layout(output, values.shape, channel_dim)


class ChannelTransformFunction(torch.autograd.Function):
    """D · T · values + bias along a channel axis, keeping only ``values`` for backward (the stages' inputs are
    recomputed from it, cheap next to the layer), with the gradients written out rather than traced."""

    @staticmethod
    def forward(ctx, values, channel_dim: int, half_strides: tuple[int, ...], rescale, bias, *stages):
        plan = stage_plan(values.shape[channel_dim], half_strides, values.device)
        with torch.no_grad():
            output, _ = run_stages(channel_layout(values, channel_dim, len(stages)), stages, plan)
            if rescale is not None and bias is not None:
                output = torch.addcmul(_per_channel(bias, output), output, _per_channel(rescale, output))
            elif rescale is not None:
                output = output.mul_(_per_channel(rescale, output))
            elif bias is not None:
                output = output.add_(_per_channel(bias, output))
        ctx.channel_dim, ctx.plan = channel_dim, plan
        ctx.save_for_backward(values, rescale, bias, *stages)
        return restore_layout(output, values.shape, channel_dim)

    @staticmethod
    def backward(ctx, grad_output):
        values, rescale, bias, *stages = ctx.saved_tensors
        grad = channel_layout(grad_output.to(values.dtype), ctx.channel_dim, len(stages))
        rescale_grad = bias_grad = None
        sum_dims = (0,) if grad.dim() == 2 else (0, 2)
        with torch.no_grad():
            layout = channel_layout(values, ctx.channel_dim, len(stages))
            rotated, inputs = run_stages(layout, stages, ctx.plan, keep_inputs=True)
            if bias is not None and ctx.needs_input_grad[4]:
                bias_grad = grad.sum(sum_dims).to(bias.dtype)
            if rescale is not None:
                if ctx.needs_input_grad[3]:
                    rescale_grad = (grad * rotated).sum(sum_dims).view(rescale.shape).to(rescale.dtype)
                grad = grad * _per_channel(rescale, grad)
            values_grad, stage_grads = run_stages_backward(grad, stages, ctx.plan, inputs, ctx.needs_input_grad[0])
        if values_grad is not None:
            values_grad = restore_layout(values_grad, values.shape, ctx.channel_dim)
        return (values_grad, None, None, rescale_grad, bias_grad, *stage_grads)


def transform_channels(values: torch.Tensor, stages: Sequence[torch.Tensor], half_strides: Sequence[int],
                       rescale: torch.Tensor | None, channel_dim: int, bias: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """:func:`transform_channels_plain` plus ``bias``, remembering only ``values`` for backward."""
    return ChannelTransformFunction.apply(values, channel_dim, tuple(half_strides), rescale, bias, *stages)


@dataclass(frozen=True)
class OFTOptions(AdapterOptions):
    """diag-OFT's and BOFT's options (``network_args`` keys, LyCORIS' names; its old ``constrain`` is read too).

    ``dropout`` and ``rank_dropout_scale`` are unused, as in LyCORIS (see each algorithm for ``rank_dropout``).
    """

    constraint: float = 0.0  # cap ‖Q‖ at constraint × out_dim (0: no cap); files keep it as the module's ``alpha``
    rescaled: bool = False  # also learn a scale per output channel (``rescale``)


class OrthogonalAdapter(AdapterModule):
    """A frozen layer whose output channels are rotated: W' = D · T(multiplier) · W, as one of LyCORIS' OFT modules.

    Keys as LyCORIS: ``oft_blocks`` (zero at first, so T = I), ``rescale`` (out, 1[, 1, 1]) of ones when
    ``rescaled``, and ``alpha`` holding the constraint (the ``alpha`` argument is ignored, as there). Subclasses say
    how ``dim`` shapes the blocks (:meth:`block_shape`) and how blocks become stages (:meth:`stages`).
    """

    options_class = OFTOptions

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0,
                 options: OFTOptions | None = None, *, block_shape: tuple[int, ...] | None = None, **option_values):
        """``block_shape`` (from a file) replaces the shape ``dim`` would give."""
        super().__init__(lora_name, org_module, dim, None, multiplier, options, **option_values)
        out_dim = self.weight_shape[0]
        self.constraint = float(self.options.constraint)
        self.norm_limit = self.constraint * out_dim  # LyCORIS scales the constraint by the output size
        self.register_buffer("alpha", torch.tensor(self.constraint))
        self.oft_blocks = nn.Parameter(torch.zeros(block_shape or self.block_shape(out_dim, self.dim)))
        if self.options.rescaled:
            self.rescale = nn.Parameter(torch.ones(out_dim, *([1] * (len(self.weight_shape) - 1))))

    @property
    def rescaled(self) -> bool:
        return "rescale" in self._parameters

    def block_shape(self, out_dim: int, dim: int) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def half_strides(self) -> tuple[int, ...]:
        """Each stage's butterfly pairing (0: contiguous blocks), see :func:`stage_plan`."""
        raise NotImplementedError

    def stages(self, multiplier: float, rank_dropout: bool) -> list[torch.Tensor]:
        """Each stage's (n, b, b) blocks of T at ``multiplier`` (with LyCORIS' rank dropout if asked)."""
        raise NotImplementedError

    @classmethod
    def from_weights(cls, lora_name: str, org_module: nn.Module, weights: dict[str, torch.Tensor],
                     multiplier: float = 1.0) -> OrthogonalAdapter:
        """Shapes come from the file; its ``alpha`` is the constraint (absent: none), ``rescale`` turns rescaling on."""
        blocks = weights["oft_blocks"]
        rescaled = "rescale" in weights
        module = cls(lora_name, org_module, blocks.shape[-1], None, multiplier, block_shape=tuple(blocks.shape),
                     constraint=file_alpha(weights) or 0.0, rescaled=rescaled)
        load_factors(module, weights, ["oft_blocks", "rescale"] if rescaled else ["oft_blocks"])
        module.check_shape()
        return module

    def _rescale_vector(self) -> torch.Tensor | None:
        return self.rescale.reshape(-1) if self.rescaled else None

    def rotated_weight(self, multiplier: float = 1.0, rank_dropout: bool = False) -> torch.Tensor:
        """W' = D · T(multiplier) · W, built on the weight's rows (what merging bakes in)."""
        stages = self.stages(multiplier, rank_dropout)
        weight = self.org_module.weight.to(stages[0].dtype)
        return transform_channels_plain(weight, stages, self.half_strides, self._rescale_vector(), 0)

    def delta_weight(self) -> torch.Tensor:
        """W' − W at multiplier 1, so that W + ΔW is exactly the rotated weight."""
        return self.weight_change(1.0)

    def weight_change(self, multiplier: float) -> torch.Tensor:
        """W'(multiplier) − W: not multiplier × ΔW, since T interpolates each block (and BOFT multiplies stages)."""
        weight = self.org_module.weight
        return self.rotated_weight(multiplier) - weight.to(self.oft_blocks.dtype)

    def norm_for_max_norm(self) -> torch.Tensor:
        """What LyCORIS' ``apply_max_norm`` measures for OFT: ‖oft_blocks‖, not ‖ΔW‖."""
        return self.oft_blocks.norm()

    def scale_delta(self, ratio: torch.Tensor) -> None:
        self.oft_blocks.mul_(ratio)  # LyCORIS' apply_max_norm scales the blocks themselves

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The cheaper of two exact forms (:meth:`_rotates_output`): the layer with its own weight and T on its
        output channels, then D and the (unrotated) bias; or the layer run once with W' built and freed per call
        (:class:`~lycolab.networks.merged_weight.MergedWeightFunction`), which a grouped conv always needs, since T
        cannot mix channels across its groups after the fact."""
        layer = self.org_module
        stages = self.stages(self.multiplier, self.training and bool(self.rank_dropout))
        if getattr(layer, "groups", 1) == 1 and self._rotates_output(x, stages):
            output = layer_forward(layer, x, layer.weight, None)
            return transform_channels(output, stages, self.half_strides, self._rescale_vector(),
                                      1 if self.is_conv else -1, layer.bias)
        factors = stages + ([self.rescale] if self.rescaled else [])
        return merged_weight_forward(x, layer, self, factors, x.new_ones(()))

    def _rotates_output(self, x: torch.Tensor, stages: list[torch.Tensor]) -> bool:
        """Whether T on the output costs less than building W' and taking the layer's full weight gradient.

        Per stage, the output side moves the layer's output (tokens × out) a few times; the weight side moves W
        (out × in·k·k) as often and adds one weight-gradient product (tokens × out × in·k·k). A Linear's output is
        moved through a transpose, about three times dearer per element than a conv's.
        """
        tokens = output_tokens(self.org_module, x)
        flat_in = math.prod(self.weight_shape[1:])
        passes = OUTPUT_PASSES * len(stages) * (1 if self.is_conv else LINEAR_OUTPUT_COST)
        return passes * tokens < OUTPUT_PASSES * len(stages) * flat_in + tokens * flat_in / PASS_FLOPS

    def _split_factors(self, factors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if self.rescaled:
            return list(factors[:-1]), factors[-1].reshape(-1)
        return list(factors), None

    def merged_weight(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
        """W' = D · T · W (``row_scale`` is unused: OFT has no per-row multiplier of its own)."""
        stages, rescale = self._split_factors(factors)
        merged = transform_channels_plain(weight.to(stages[0].dtype), stages, self.half_strides, rescale, 0)
        return merged.to(dtype)

    def merged_weight_backward(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                               dtype: torch.dtype, grad_merged: WeightGradient, need_merged: bool
                               ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """∂L/∂W' pulled back through D and the stages onto their blocks (and W' again for the input gradient)."""
        stages, rescale = self._split_factors(factors)
        plan = stage_plan(weight.shape[0], self.half_strides, weight.device)
        values = channel_layout(weight.to(stages[0].dtype), 0)
        grad = channel_layout(grad_merged.full().to(values.dtype), 0)
        rotated, inputs = run_stages(values, stages, plan, keep_inputs=True)
        grads = []
        if rescale is not None:
            grads = [(grad * rotated).sum((0, 2)).view(self.rescale.shape)]
            grad = grad * _per_channel(rescale, grad)
            rotated = rotated * _per_channel(rescale, rotated)
        _, stage_grads = run_stages_backward(grad, stages, plan, inputs, need_values=False)
        merged = rotated.view(weight.shape).to(dtype) if need_merged else None
        return merged, stage_grads + grads
