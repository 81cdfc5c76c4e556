"""What every adapter shares: wrapping a frozen layer, ``scale = alpha / dim``, the multiplier, the dropouts, and
LyCORIS' LoRA-family options (``rs_lora``, ``use_scalar``, DoRA's ``dora_wd``), which act on any ΔW the same way.

The algorithms (``lycolab.networks.algorithms``) differ only in how they make ΔW and, for speed, how they run
forward; everything else lives here, and each describes itself in the registry, so adding one touches one file.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lycolab.networks.dora import decompose, decomposed_forward, initial_magnitude, magnitude_on_output, magnitude_shape
from lycolab.networks.merged_weight import WORKSPACE, WeightGradient, layer_forward, merged_weight_forward
from lycolab.networks.registry import AdapterOptions, make_options


class AdapterShapeError(ValueError):
    """Tensors that do not fit the layer they name (usually an adapter made for another base model)."""


class LayerWrapper(nn.Module):
    """What every adapter does with its frozen layer: hold it without owning its parameters, and route its calls
    through the adapter's forward until restored (AdapterModule for Linear/Conv2d, train_norm's NormAdapter)."""

    def _hold(self, org_module: nn.Module) -> None:
        # Kept in a list so nn.Module does not register it: the network's parameters are the adapter's only.
        self._org = [org_module]
        self._org_forward = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        """Route the original layer's calls through this adapter (the layer's weights are not touched)."""
        if self._org_forward is None:
            self._org_forward = self.org_module.forward
            self.org_module.forward = self.forward

    def restore(self) -> None:
        """Undo :meth:`apply_to`; the layer behaves exactly as before."""
        if self._org_forward is not None:
            if not self.wraps_another_wrapper:
                del self.org_module.forward  # the class's own forward again, no instance attribute left behind
            else:
                self.org_module.forward = self._org_forward  # another wrapper was there first: give it back
            self._org_forward = None

    @property
    def wraps_another_wrapper(self) -> bool:
        """Whether the layer's forward was already replaced when this adapter was applied (two networks on one
        layer): then its calls must go through that forward, not straight to the layer's weights."""
        forward = self._org_forward
        return forward is not None and getattr(forward, "__func__", None) is not type(self.org_module).forward

    def original_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._org_forward(x) if self._org_forward is not None else self.org_module.forward(x)


class AdapterModule(LayerWrapper):
    """A trainable ΔW beside one frozen Linear/Conv2d, called instead of the layer's own forward.

    ``dropout`` / ``rank_dropout`` / ``module_dropout`` act only in training mode, with the meaning sd-scripts and
    LyCORIS give them (see each algorithm); ``module_dropout`` skips the whole adapter for a step.

    LoRA-family options (fields of ``LoRAOptions``; other algorithms' options lack them and get the defaults), as
    LyCORIS 4.1.3 defines them for LoCon, LoHa and LoKr:

    * ``rs_lora``: scale = alpha / √dim instead of alpha / dim; the ``alpha`` saved is alpha·√dim, so a loader that
      knows nothing of rs_lora (alpha / dim) applies the same ΔW.
    * ``use_scalar``: a trainable ``scalar`` multiplying ΔW, starting at 0 (so the factor that would be zero starts
      random instead, see each algorithm). Files hold no ``scalar``: it is folded into one factor when saving
      (:meth:`scalar_key`), and loading a state dict back sets it to 1.
    * ``dora_wd`` / ``wd_on_output``: DoRA's weight decomposition (:mod:`lycolab.networks.dora`), a trainable
      ``dora_scale`` of the original weight's norms per output row (or per input column); the layer then runs with
      the decomposed weight through :func:`decomposed_forward`, which needs the algorithm's merge recipe
      (:meth:`factors`, :meth:`make_delta`, :meth:`merged_weight`, :meth:`merged_weight_backward`).
    """

    algo = ""
    options_class: type[AdapterOptions] = AdapterOptions
    has_max_norm_rule = True  # False where LyCORIS' apply_max_norm does nothing (IA3, full, GLoRA)
    reads_dora_scale = False  # whether from_weights rebuilds DoRA's weight decomposition (``dora_scale``)

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None, multiplier: float = 1.0,
                 options: AdapterOptions | None = None, **option_values):
        """``options`` (this algorithm's ``options_class``) with ``option_values`` replacing fields by name."""
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            kind = type(org_module).__name__
            raise TypeError(f"{lora_name}: only Linear and Conv2d layers can be adapted, got {kind}")
        self.options = make_options(self.options_class, options, **option_values)
        self.lora_name = lora_name
        self.dim = int(dim)
        alpha = float(self.dim) if alpha is None or float(alpha) == 0 else float(alpha)
        rank_factor = math.sqrt(self.dim) if getattr(self.options, "rs_lora", False) else self.dim
        self.scale = alpha / rank_factor
        self.register_buffer("alpha", torch.tensor(alpha * (self.dim / rank_factor)))
        self.multiplier = multiplier
        self.dropout = float(self.options.dropout or 0.0)
        self.rank_dropout = float(self.options.rank_dropout or 0.0)
        self.module_dropout = float(self.options.module_dropout or 0.0)
        self.rank_dropout_scale = bool(self.options.rank_dropout_scale)
        self.use_scalar = bool(getattr(self.options, "use_scalar", False))
        if self.use_scalar:
            self.scalar = nn.Parameter(torch.tensor(0.0))
            self.register_state_dict_post_hook(_fold_scalar)
        self.dora = bool(getattr(self.options, "dora_wd", False))
        self.dora_on_output = bool(getattr(self.options, "wd_on_output", True))
        if self.dora:
            self.dora_scale = nn.Parameter(initial_magnitude(org_module.weight, self.dora_on_output))
        self._hold(org_module)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.org_module, nn.Conv2d)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.org_module.weight.shape)

    # ----------------------------------------------------------------------------------------------- ΔW
    def own_factors(self) -> list[torch.Tensor]:
        """The algorithm's parameters ΔW is made of, in a fixed order (``scalar`` and ``dora_scale`` not included)."""
        raise NotImplementedError

    def factor_delta(self, *factors: torch.Tensor) -> torch.Tensor:
        """ΔW from :meth:`own_factors` (or stand-ins for them), scale included, in the layer's weight shape."""
        raise NotImplementedError

    def factors(self) -> list[torch.Tensor]:
        """:meth:`own_factors`, then ``scalar`` with ``use_scalar``: what :meth:`make_delta` takes."""
        own = self.own_factors()
        return [*own, self.scalar] if self.use_scalar else own

    def make_delta(self, *factors: torch.Tensor) -> torch.Tensor:
        """ΔW from :meth:`factors`: scale and scalar included, multiplier and DoRA's decomposition not."""
        if self.use_scalar:
            *factors, scalar = factors
            return self.factor_delta(*factors) * scalar
        return self.factor_delta(*factors)

    def delta_weight(self) -> torch.Tensor:
        """How the adapter changes the layer's weight at multiplier 1, in its shape: ΔW, or for DoRA W' − W (the
        decomposed weight minus the original), so that W + delta_weight() runs exactly as the adapter does."""
        return self.weight_change(1.0) if self.dora else self.make_delta(*self.factors())

    def weight_change(self, multiplier: float) -> torch.Tensor:
        """W' − W the forward applies at ``multiplier`` (rank dropout aside): multiplier · ΔW, except for DoRA,
        whose multiplier acts inside the decomposition (:mod:`lycolab.networks.dora`), so this is what merging at
        another ratio must add to stay equal to the forward."""
        if not self.dora:
            return self.delta_weight() * multiplier
        weight = self.org_module.weight
        merged = weight.to(self.dora_scale.dtype) + self.make_delta(*self.factors())
        return decompose(merged, self.dora_scale, multiplier, self.dora_on_output) - weight

    def max_norm_delta(self) -> torch.Tensor:
        """ΔW as LyCORIS' ``apply_max_norm`` measures it: the factors' ΔW (scale and scalar in), before DoRA."""
        return self.make_delta(*self.factors()) if self.dora else self.delta_weight()

    def norm_for_max_norm(self) -> torch.Tensor:
        """The norm LyCORIS' ``apply_max_norm`` compares with the limit (OFT measures its blocks instead)."""
        return self.max_norm_delta().norm()

    def delta_bias(self) -> torch.Tensor | None:
        """How the adapter changes the layer's bias (full's ``diff_b``); None for the algorithms that leave it."""
        return None

    def scale_delta(self, ratio: torch.Tensor) -> None:
        """Multiply ΔW by ``ratio`` in place, in the parameter LyCORIS' max-norm rule scales for this algorithm."""
        raise NotImplementedError(f"{self.lora_name}: no max-norm rule for {type(self).__name__}")

    def scalar_key(self) -> str:
        """The state-dict key ``scalar`` is folded into when saving (LyCORIS' ``custom_state_dict``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ forward
    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return self.original_forward(x)
        if self.dora:
            return decomposed_forward(x, self.org_module, self, self.factors(), self.row_mask(x.device),
                                      self.dora_scale, self.multiplier, self.dora_on_output)
        return self.adapted_forward(x)

    def frozen_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The original layer's operation with another weight (its bias, stride and padding kept)."""
        return layer_forward(self.org_module, x, weight, self.org_module.bias)

    def row_mask(self, device: torch.device) -> torch.Tensor:
        """Per output row: 1, or while training the rank-dropout keep mask (LyCORIS drops whole rows of ΔW),
        rescaled by the kept fraction if ``rank_dropout_scale``."""
        rows = self.weight_shape[0]
        if not (self.training and self.rank_dropout):
            return torch.ones(rows, device=device)
        mask = (torch.rand(rows, device=device) > self.rank_dropout).float()
        if self.rank_dropout_scale:
            mask /= mask.mean().clamp(min=1.0 / rows)
        return mask

    def row_scale(self, device: torch.device) -> torch.Tensor:
        """Per output row: the multiplier, times the rank-dropout mask while training."""
        return self.row_mask(device) * float(self.multiplier)

    # ------------------------------------------------------------------------- merge recipe (generic)
    def merged_weight(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
        """W + row_scale[:, None] · ΔW(factors), in ``dtype``, in ``WORKSPACE``'s "merged" slot (see
        :class:`~lycolab.networks.merged_weight.MergeRecipe`)."""
        delta = scale_rows(self.make_delta(*factors), row_scale)
        merged = torch.add(delta, weight, out=WORKSPACE.take("merged", weight.shape, delta.dtype, weight.device))
        return merged.to(dtype)

    def merged_weight_backward(self, weight: torch.Tensor, factors: list[torch.Tensor], row_scale: torch.Tensor,
                               dtype: torch.dtype, grad_merged: WeightGradient, need_merged: bool
                               ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Rebuild ΔW under autograd and pull the weight gradient back through that small graph only."""
        leaves = [factor.detach().requires_grad_() for factor in factors]
        with torch.enable_grad():
            delta = self.make_delta(*leaves)
        grads = torch.autograd.grad(delta, leaves, scale_rows(grad_merged.full().to(delta.dtype), row_scale))
        merged = None
        if need_merged:
            delta = scale_rows(delta.detach(), row_scale)
            merged = torch.add(delta, weight, out=WORKSPACE.take("merged", weight.shape, delta.dtype, weight.device))
        return (None if merged is None else merged.to(dtype)), list(grads)

    # ------------------------------------------------------------------------------------------ files
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A state dict holds no ``scalar`` (it was folded into a factor when saved): load the rest, scalar = 1."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.use_scalar and prefix + "scalar" not in state_dict:
            if prefix + "scalar" in missing_keys:
                missing_keys.remove(prefix + "scalar")
            with torch.no_grad():
                self.scalar.fill_(1.0)

    def check_shape(self) -> None:
        """Raise :class:`AdapterShapeError` unless ΔW has the layer's weight shape."""
        with torch.no_grad():
            try:
                shape = tuple(self.delta_weight().shape)
            except RuntimeError as error:
                shape = f"unbuildable ({str(error).splitlines()[0]})"
        if shape != self.weight_shape:
            raise AdapterShapeError(f"{self.lora_name}: ΔW from the file is {shape} but the layer is "
                                    f"{self.weight_shape}; is the adapter for another base model (SD 1.x vs 2.x)?")


class MergedWeightAdapter(AdapterModule):
    """An algorithm built from factors (LoHa, LoKr) whose generic forward runs the layer with W + m·ΔW.

    Subclasses define :meth:`own_factors` (their parameters, in a fixed order) and :meth:`factor_delta` (ΔW from
    those factors, scale included); they may override the two merge methods with faster equivalents, or
    :meth:`adapted_forward` with a factored form where one is cheaper. Rank dropout follows
    LyCORIS: whole rows (output channels) of ΔW are dropped, rescaled by the kept fraction if
    ``rank_dropout_scale``.
    """

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return merged_weight_forward(x, self.org_module, self, self.factors(), self.row_scale(x.device))


def _fold_scalar(module: AdapterModule, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: ``scalar`` folded into its factor, as LyCORIS saves it (a file has no ``scalar`` key)."""
    scalar = state_dict.pop(prefix + "scalar")
    key = prefix + module.scalar_key()
    with torch.no_grad():
        state_dict[key] = state_dict[key] * scalar.detach().to(state_dict[key].dtype)


def dora_options(weights: dict[str, torch.Tensor], org_module: nn.Module) -> dict[str, bool]:
    """The options that rebuild a file module's DoRA (none without ``dora_scale``): which axis its norms are on."""
    if "dora_scale" not in weights:
        return {}
    return {"dora_wd": True, "wd_on_output": magnitude_on_output(weights["dora_scale"], tuple(org_module.weight.shape))}


def load_dora_scale(module: AdapterModule, weights: dict[str, torch.Tensor]) -> None:
    """Replace the module's ``dora_scale`` by the file's (any layout with the right number of norms)."""
    if "dora_scale" in weights:
        tensor = weights["dora_scale"].reshape(magnitude_shape(module.weight_shape, module.dora_on_output))
        module.dora_scale = new_parameter(tensor)


def scale_rows(tensor: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """``tensor`` with row i multiplied by ``row_scale[i]`` (a new tensor)."""
    return tensor * row_scale.to(tensor.dtype).view(-1, *([1] * (tensor.dim() - 1)))


def layer_shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out features/channels, in features/channels, kernel size) of a Linear or Conv2d."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    return module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)


def output_tokens(layer: nn.Module, x: torch.Tensor) -> int:
    """How many output positions the layer computes for ``x``: tokens for a Linear, N·H'·W' for a conv."""
    if isinstance(layer, nn.Linear):
        return x.numel() // layer.in_features
    height, width = x.shape[-2:]
    sizes = [(size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1 for size, pad, dil, kernel, stride in
             zip((height, width), layer.padding, layer.dilation, layer.kernel_size, layer.stride, strict=True)]
    return (x.numel() // (layer.in_channels * height * width)) * sizes[0] * sizes[1]


def new_parameter(tensor: torch.Tensor) -> nn.Parameter:
    """A float32 trainable copy of a tensor read from a file (files are often fp16/bf16)."""
    return nn.Parameter(tensor.detach().to(torch.float32).clone())


def file_alpha(weights: dict[str, torch.Tensor]) -> float | None:
    """A module's ``alpha`` from a file; absent means alpha = dim (scale 1), as in sd-scripts and LyCORIS."""
    alpha = weights.get("alpha")
    return None if alpha is None else float(alpha)


def load_factors(module: nn.Module, weights: dict[str, torch.Tensor], names: list[str]) -> None:
    """Replace the module's parameters ``names`` by the file's tensors (shapes come from the file)."""
    for name in names:
        setattr(module, name, new_parameter(weights[name]))
