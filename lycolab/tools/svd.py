"""What resize, extract and merge share: ΔW of any adapter file's modules without a model, SVDs of ΔW (cheap ones for
factored LoRAs), the rank rules of sd-scripts and LyCORIS, and LoRA/LoCon tensors with kohya's keys and shapes.

Rebuilding ΔW without the base model needs each layer's weight shape, which a file mostly tells: LoRA/LoCon factors
carry it whole, tucker cores and LoKr's full ``lokr_w2`` carry the kernel. Only LoHa/LoKr factors flattened to
``(…, in·k·k)`` leave the kernel (and Linear vs 1x1 conv) open; then the layer's name decides, since the kind of
each Stable Diffusion layer follows from its name (``…_resnets_0_conv1`` is 3x3, ``…_conv_shortcut`` 1x1,
``…_proj_in`` a 1x1 conv in SD 1.x and a Linear in SD 2.x/SDXL). ``base_model=`` replaces all of that with the
model's own layers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lycolab.networks.algorithms.lora import LoRAModule
from lycolab.networks.base import AdapterModule
from lycolab.networks.io import (
    AdapterFileError,
    build_adapters,
    group_by_module,
    read_adapter_file,
    unsupported_algorithm,
)
from lycolab.networks.registry import algorithm_of_module

logger = logging.getLogger(__name__)

SAVE_PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "float32": torch.float32,
                   "fp16": torch.float16, "bf16": torch.bfloat16}
SDXL_MODEL_VERSION = "sdxl_base_v1-0"
# sd-scripts' resize_lora: a ΔW whose largest singular value is below this is a zero matrix (kept at rank 1)
MIN_SINGULAR_VALUE = 1e-6
# U-Net layer names (diffusers and sd-scripts' SDXL layout) ending so are 3x3 convs: ResNet convs, samplers, in/out
KXK_SUFFIXES = ("_conv1", "_conv2", "_conv", "_conv_in", "_conv_out", "_in_layers_2", "_out_layers_3", "_op")
KXK_NAMES = ("lora_unet_input_blocks_0_0", "lora_unet_out_2")
ONE_BY_ONE_SUFFIXES = ("_conv_shortcut", "_skip_connection")
PROJECTION_SUFFIXES = ("_proj_in", "_proj_out")


class ToolError(ValueError):
    """Bad arguments or inputs for an adapter tool; the message names the file or argument and the fix."""


def save_dtype(precision: str) -> torch.dtype:
    """``"fp16"`` / ``"bf16"`` / ``"float"`` (sd-scripts' ``--save_precision`` spellings) → the torch dtype."""
    dtype = SAVE_PRECISIONS.get(str(precision).lower())
    if dtype is None:
        raise ToolError(f"save_precision {precision!r}: choose one of {', '.join(SAVE_PRECISIONS)}")
    return dtype


# ------------------------------------------------------------------------------------------------ layer shapes


@dataclass(frozen=True)
class LayerShape:
    """A layer's weight shape: (out, in) for a Linear, (out, in, kh, kw) for a conv."""

    out_features: int
    in_features: int
    kernel: tuple[int, ...] = ()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)

    @property
    def is_kxk(self) -> bool:
        return self.is_conv and self.kernel != (1, 1)

    def placeholder(self) -> nn.Module:
        """A weightless layer of this shape (meta device): enough for an adapter to know its ΔW's shape."""
        if self.is_conv:
            return nn.Conv2d(self.in_features, self.out_features, self.kernel, bias=False, device="meta")
        return nn.Linear(self.in_features, self.out_features, bias=False, device="meta")


def shape_of(module: nn.Module) -> LayerShape:
    out_features, in_features, *kernel = module.weight.shape
    return LayerShape(out_features, in_features, tuple(kernel))


def uses_linear_projection(metadata: dict[str, str]) -> bool:
    """SD 2.x and SDXL run ``proj_in``/``proj_out`` as Linear layers, SD 1.x as 1x1 convs (``ss_*`` metadata)."""
    version = metadata.get("ss_base_model_version", "")
    return metadata.get("ss_v2", "").lower() == "true" or version.startswith(("sd_v2", "sdxl"))


def flat_layer_shape(name: str, out_features: int, flat_in: int, linear_projection: bool) -> LayerShape:
    """The layer behind a ΔW stored as (out, in·k·k), told by the layer's name (see the module docstring)."""
    unet = name.startswith("lora_unet_")
    if unet and (name.endswith(KXK_SUFFIXES) or name in KXK_NAMES) and flat_in % 9 == 0:
        return LayerShape(out_features, flat_in // 9, (3, 3))
    if unet and (name.endswith(ONE_BY_ONE_SUFFIXES) or (name.endswith(PROJECTION_SUFFIXES) and not linear_projection)):
        return LayerShape(out_features, flat_in, (1, 1))
    return LayerShape(out_features, flat_in)


def layer_shape_from_tensors(name: str, parameters: dict[str, torch.Tensor], linear_projection: bool
                             ) -> LayerShape | None:
    """The layer a file's module adapts, from its tensors' shapes (None unless LoRA, LoHa, LoKr or full ones)."""
    def shape(key: str) -> tuple[int, ...]:
        return tuple(parameters[key].shape)

    if "diff" in parameters:  # full: ΔW itself
        diff = shape("diff")
        return LayerShape(diff[0], diff[1], diff[2:]) if len(diff) >= 2 else None
    if "lora_down.weight" in parameters and "lora_up.weight" in parameters:
        down, out_features = shape("lora_down.weight"), shape("lora_up.weight")[0]
        if "lora_mid.weight" in parameters:
            return LayerShape(out_features, down[1], shape("lora_mid.weight")[2:])
        return LayerShape(out_features, down[1], down[2:])
    if "hada_w1_a" in parameters and "hada_w1_b" in parameters:
        if "hada_t1" in parameters:
            return LayerShape(shape("hada_w1_a")[1], shape("hada_w1_b")[1], shape("hada_t1")[2:])
        return flat_layer_shape(name, shape("hada_w1_a")[0], shape("hada_w1_b")[1], linear_projection)
    return _lokr_layer_shape(name, parameters, linear_projection)


def _lokr_layer_shape(name: str, parameters: dict[str, torch.Tensor], linear_projection: bool) -> LayerShape | None:
    if "lokr_w1" in parameters:
        out_small, in_small = parameters["lokr_w1"].shape
    elif "lokr_w1_a" in parameters and "lokr_w1_b" in parameters:
        out_small, in_small = parameters["lokr_w1_a"].shape[0], parameters["lokr_w1_b"].shape[1]
    else:
        return None
    if "lokr_w2" in parameters:
        w2 = parameters["lokr_w2"].shape
        if len(w2) == 4:
            return LayerShape(out_small * w2[0], in_small * w2[1], tuple(w2[2:]))
        return flat_layer_shape(name, out_small * w2[0], in_small * w2[1], linear_projection)
    if "lokr_w2_a" not in parameters or "lokr_w2_b" not in parameters:
        return None
    w2_a, w2_b = parameters["lokr_w2_a"].shape, parameters["lokr_w2_b"].shape
    if "lokr_t2" in parameters:
        return LayerShape(out_small * w2_a[1], in_small * w2_b[1], tuple(parameters["lokr_t2"].shape[2:]))
    return flat_layer_shape(name, out_small * w2_a[0], in_small * w2_b[1], linear_projection)


def model_layers(base_model: str | Path) -> dict[str, nn.Module]:
    """Every Linear/Conv2d of a base model under its adapter-file names (both SDXL layouts)."""
    from lycolab.models.load import load_stable_diffusion
    from lycolab.networks.io import adaptable_layers

    parts = load_stable_diffusion(base_model)
    return adaptable_layers(parts.unet, parts.text_encoders)


# ------------------------------------------------------------------------------------------------ file modules


@dataclass
class AdapterFile:
    """An adapter file's modules rebuilt as lycolab adapters (on placeholder or model layers), and its metadata."""

    path: Path
    modules: dict[str, AdapterModule]
    metadata: dict[str, str]


def rebuild_adapter_file(path: str | Path, layers: dict[str, nn.Module] | None = None, device: str = "cpu"
                         ) -> AdapterFile:
    """Read a file and rebuild every module; modules no registered algorithm rebuilds are refused by name.

    ``layers`` (from :func:`model_layers`) gives the exact layers; without it placeholders of the shape the tensors
    tell stand in, which serves every algorithm whose ΔW is made of its own factors (LoRA, LoHa, LoKr, full). One
    whose ΔW needs the base weight itself ((IA)³, OFT) asks for ``base_model``.
    """
    path = Path(path)
    tensors, metadata = read_adapter_file(path)
    linear_projection = uses_linear_projection(metadata)
    targets: dict[str, nn.Module] = {}
    for name, parameters in group_by_module(tensors).items():
        if layers is not None and name in layers:
            targets[name] = layers[name]
            continue
        algorithm = algorithm_of_module(parameters)
        if algorithm is None:
            other = unsupported_algorithm(parameters)
            known = ", ".join(sorted(parameters))
            what = f"use {other}" if other else f"hold no tensors of a known algorithm ({known})"
            raise AdapterFileError(f"{path}: module {name} and maybe others {what}, which lycolab cannot rebuild; "
                                   "only files of lycolab's algorithms can be resized or merged")
        shape = layer_shape_from_tensors(name, parameters, linear_projection)
        if shape is None:
            raise AdapterFileError(f"{path}: {name} is {algorithm.title}, whose ΔW depends on the base model's "
                                   "weights; pass base_model= (the model the adapter was trained on)")
        targets[name] = shape.placeholder()
    adapters, _, _ = build_adapters(path, tensors, targets, 1.0)
    if not adapters:
        raise AdapterFileError(f"{path}: no adapter modules in this file; is it a LoRA/LyCORIS file?")
    modules = {adapter.lora_name: adapter.to(device) for adapter in adapters}
    return AdapterFile(path, modules, metadata)


def is_plain_lora(adapter: AdapterModule) -> bool:
    return adapter.algo == "lora" and not getattr(adapter, "tucker", False)


def lora_factors(adapter: AdapterModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of a plain LoRA as matrices (out, rank) and (rank, in·k·k), scale not included."""
    return adapter.lora_up.weight.detach().flatten(1).float(), adapter.lora_down.weight.detach().flatten(1).float()


@torch.no_grad()
def flat_delta(adapter: AdapterModule) -> torch.Tensor:
    """ΔW (scale included, multiplier not) as an (out, in·k·k) float32 matrix."""
    return adapter.delta_weight().detach().float().flatten(1)


# ------------------------------------------------------------------------------------------------ SVD


@torch.no_grad()
def factored_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``up @ down`` without forming it: QR of both factors, then an SVD of a rank×rank matrix.

    Exactly the SVD sd-scripts takes of the full product (whose other singular values are zero), at the cost of
    the rank instead of the layer size.
    """
    up_q, up_r = torch.linalg.qr(up.float())
    down_q, down_r = torch.linalg.qr(down.float().t())
    core_u, singular_values, core_vh = torch.linalg.svd(up_r @ down_r.t(), full_matrices=False)
    return up_q @ core_u, singular_values, core_vh @ down_q.t()


@torch.no_grad()
def dense_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(matrix.float(), full_matrices=False)


def truncate(u: torch.Tensor, singular_values: torch.Tensor, vh: torch.Tensor, rank: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) = (U·S, Vh) cut to ``rank``, as sd-scripts and LyCORIS split a ΔW."""
    return u[:, :rank] * singular_values[:rank], vh[:rank]


def numerical_rank(singular_values: torch.Tensor, rows: int, columns: int) -> int:
    """How many singular values stand above float32 rounding (numpy's ``matrix_rank`` tolerance): cutting there
    loses nothing a float32 ΔW holds."""
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 1
    tolerance = float(singular_values[0]) * max(rows, columns) * torch.finfo(torch.float32).eps
    return max(1, int((singular_values > tolerance).sum()))


@dataclass(frozen=True)
class Retention:
    """What a rank cut keeps of ΔW, as sd-scripts' resize prints it (fractions, not percents)."""

    sum_retained: float  # Σ kept S / Σ S
    fro_retained: float  # ‖kept ΔW‖_F / ‖ΔW‖_F = sqrt(Σ kept S² / Σ S²)
    max_ratio: float  # S[0] / S[rank - 1]

    @property
    def relative_error(self) -> float:
        """‖ΔW − kept ΔW‖_F / ‖ΔW‖_F, which the cut's orthogonality ties to ``fro_retained``."""
        return max(0.0, 1.0 - self.fro_retained ** 2) ** 0.5


def retention(singular_values: torch.Tensor, rank: int) -> Retention:
    values = singular_values.abs().double()
    total, squares = float(values.sum()), values.pow(2)
    fro_total = float(squares.sum().sqrt())
    sum_retained = float(values[:rank].sum()) / total if total else 1.0
    fro_retained = float(squares[:rank].sum().sqrt()) / fro_total if fro_total else 1.0
    smallest = float(values[rank - 1]) if rank <= values.numel() else 0.0
    max_ratio = float(values[0]) / smallest if smallest else float("inf")
    return Retention(sum_retained, fro_retained, max_ratio)


# ------------------------------------------------------------------------------------------------ rank rules


DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
EXTRACT_MODES = ("fixed", "threshold", "ratio", "quantile")


def dynamic_rank(singular_values: torch.Tensor, method: str, parameter: float) -> int:
    """sd-scripts' ``index_sv_*`` + 1: the rank keeping singular values within ``parameter`` of the largest
    (``sv_ratio``), that fraction of ‖ΔW‖_F (``sv_fro``) or of Σ S (``sv_cumulative``)."""
    values = singular_values.float()
    if method == "sv_ratio":
        index = int((values > values[0] / parameter).sum())
    elif method == "sv_fro":
        squares = values.pow(2)
        index = int(torch.searchsorted(torch.cumsum(squares, 0) / squares.sum(), parameter ** 2)) + 1
    else:
        index = int(torch.searchsorted(torch.cumsum(values, 0) / values.sum(), parameter)) + 1
    return max(1, min(index, values.numel() - 1)) + 1


def resize_rank(singular_values: torch.Tensor, max_rank: int | None, method: str | None, parameter: float | None
                ) -> int:
    """sd-scripts' ``rank_resize``: the dynamic rank (or ``max_rank``), at most ``max_rank``; 1 for a zero ΔW."""
    if float(singular_values[0]) <= MIN_SINGULAR_VALUE:
        return 1
    rank = dynamic_rank(singular_values, method, float(parameter)) if method else int(max_rank)
    return rank if max_rank is None else min(rank, int(max_rank))


def extract_rank(singular_values: torch.Tensor, mode: str, parameter: float, out_features: int,
                 in_features: int) -> int:
    """LyCORIS' ``extract_linear``/``extract_conv`` rank: ``fixed`` = parameter; ``threshold`` = singular values
    above it; ``ratio`` = those above parameter·max(S); ``quantile`` = the ones before the cumulative sum reaches
    parameter·Σ S; then clamped to [1, min(out, in channels)]."""
    if mode == "fixed":
        rank = int(parameter)
    elif mode == "threshold":
        rank = int((singular_values > parameter).sum())
    elif mode == "ratio":
        rank = int((singular_values > singular_values.max() * parameter).sum())
    else:
        rank = int((torch.cumsum(singular_values, 0) < parameter * singular_values.sum()).sum())
    return min(out_features, in_features, max(1, rank))


# ------------------------------------------------------------------------------------------------ LoRA tensors


def lora_tensors(name: str, up: torch.Tensor, down: torch.Tensor, alpha: float, shape: LayerShape,
                 mid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """kohya keys for ΔW = (alpha/rank)·up·down: Linear (out, r)/(r, in); conv up (out, r, 1, 1), down
    (r, in, kh, kw) — or, with a tucker ``mid`` (r, r, kh, kw), a 1x1 down (r, in, 1, 1)."""
    rank = down.shape[0]
    up, down = up.detach().float().cpu(), down.detach().float().cpu()
    if shape.is_conv:
        up = up.reshape(shape.out_features, rank, 1, 1)
        down = down.reshape(rank, shape.in_features, *((1, 1) if mid is not None else shape.kernel))
    tensors = {f"{name}.lora_up.weight": up.contiguous(), f"{name}.lora_down.weight": down.contiguous(),
               f"{name}.alpha": torch.tensor(float(alpha))}
    if mid is not None:
        tensors[f"{name}.lora_mid.weight"] = mid.detach().float().cpu().contiguous()
    return tensors


@torch.no_grad()
def written_delta(name: str, tensors: dict[str, torch.Tensor], shape: LayerShape, dtype: torch.dtype
                  ) -> torch.Tensor:
    """ΔW as a loader will rebuild it from these tensors once saved in ``dtype`` (an (out, in·k·k) matrix)."""
    prefix = name + "."
    parameters = {key[len(prefix):]: value.to(dtype) if value.is_floating_point() else value
                  for key, value in tensors.items() if key.startswith(prefix)}
    module = LoRAModule.from_weights(name, shape.placeholder(), parameters)
    return flat_delta(module)


def relative_error(true: torch.Tensor, approximation: torch.Tensor) -> float:
    """‖true − approximation‖_F / ‖true‖_F (0 when both are zero)."""
    true, approximation = true.double().cpu(), approximation.double().cpu()
    norm = float(true.norm())
    difference = float((true - approximation.reshape(true.shape)).norm())
    if norm == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / norm


def updated_network_args(metadata: dict[str, str], conv_dim: int | str | None, conv_alpha: float | str | None,
                         drop: tuple[str, ...] = ()) -> str:
    """``ss_network_args`` (JSON) without the ``drop`` keys, ``conv_dim``/``conv_alpha`` set (removed when None)."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        args = {}
    args = args if isinstance(args, dict) else {}
    for key in (*drop, "conv_dim", "conv_alpha"):
        args.pop(key, None)
    if conv_dim is not None:
        args.update(conv_dim=str(conv_dim), conv_alpha=str(conv_alpha))
    return json.dumps(args)


def common_value(values: list) -> str:
    """The one value all modules share, or ``"Dynamic"`` (sd-scripts' word for per-module dims/alphas)."""
    distinct = set(values)
    if len(distinct) == 1:
        value = distinct.pop()
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    return "Dynamic"


def format_alpha(alpha: float) -> float | int:
    return int(alpha) if float(alpha).is_integer() else round(float(alpha), 6)


def percent(fraction: float) -> str:
    return f"{fraction:.1%}"


def output_path(out: str | Path) -> Path:
    """Where a tool writes: a ``.safetensors`` file (other formats could run code when loaded)."""
    path = Path(out)
    if path.suffix.lower() != ".safetensors":
        raise ToolError(f"{path}: the output must be a .safetensors file; name it NAME.safetensors")
    return path
