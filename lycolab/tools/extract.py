"""Extracting a LoRA/LoCon from the difference of two models, with LyCORIS' ``tools/extract_locon.py`` rules
(``lycoris.utils.extract_diff`` / ``extract_linear`` / ``extract_conv``).

Every Linear and Conv2d of the U-Net (and, with ``text_encoder``, of the text encoders) whose weights differ
(``torch.allclose`` says so, as in LyCORIS) gets ΔW = tuned − base split by SVD at a rank chosen by ``mode``:
``fixed`` (``linear_dim``/``conv_dim``), ``threshold`` (singular values above it), ``ratio`` (above that fraction
of the largest) or ``quantile`` (the singular values before their running sum reaches that fraction of the total),
clamped to [1, min(out, in channels)]. Linear layers and 1x1 convs take the linear parameter, kxk convs the conv
one. alpha = rank (scale 1). Names are kohya's — what sd-scripts' model loaders, which ``extract_locon.py`` uses,
call the layers (SDXL in the original layout).

Two differences from LyCORIS, both measured and both there to keep ΔW:

- LyCORIS splits kxk convs once more by default (CP/tucker: a 1x1 down, a kxk ``lora_mid`` core, a 1x1 up, the
  core's inner rank equal to the rank). That second cut is lossy: on the tiny SD with rank-2 conv differences it
  left relative errors of 0.54–0.90 in ΔW where the plain LoCon split left ≤ 0.002. Here plain LoCon is the default and
  ``use_tucker=True`` gives LyCORIS' form (its ``--disable_cp`` is our default).
- Where the rank reaches half the layer's outputs LyCORIS stores the whole ΔW as a ``diff`` tensor, which A1111,
  ComfyUI and lycolab's LoRA loaders do not apply; here such layers stay LoRA at the clamped rank (exact when that
  is full rank).

Each module reports the relative error of ΔW as written (save precision included) against the true difference.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lycolab.display import ShownAsTable, Table
from lycolab.networks.io import save_adapter_file
from lycolab.networks.naming import UNET_PREFIX, canonical_named_modules, lora_name, text_encoder_prefix
from lycolab.tools.svd import (
    EXTRACT_MODES,
    SDXL_MODEL_VERSION,
    LayerShape,
    ToolError,
    common_value,
    dense_svd,
    extract_rank,
    lora_tensors,
    output_path,
    relative_error,
    save_dtype,
    shape_of,
    truncate,
    written_delta,
)


@dataclass
class ModuleExtract:
    """One extracted layer: its kind, the rank chosen and the error of ΔW as written."""

    name: str
    kind: str  # "linear", "conv 1x1" or "conv 3x3"
    rank: int
    relative_error: float  # ‖(tuned − base) − ΔW written‖_F / ‖tuned − base‖_F


@dataclass
class ExtractReport(ShownAsTable):
    path: Path
    base_model: Path
    tuned_model: Path
    mode: str
    modules: list[ModuleExtract] = field(default_factory=list)
    unchanged: int = 0  # layers whose weights are equal in both models (no module written)

    @property
    def max_error(self) -> float:
        return max((module.relative_error for module in self.modules), default=0.0)

    def table(self) -> Table:
        rows = [{"module": module.name, "layer": module.kind, "rank": module.rank,
                 "error": f"{module.relative_error:.2e}"} for module in self.modules]
        mean = statistics.fmean(module.relative_error for module in self.modules) if self.modules else 0.0
        notes = [f"relative error of ΔW: mean {mean:.2e}, max {self.max_error:.2e}",
                 f"{self.unchanged} layer(s) are the same in both models (nothing to extract)",
                 f"written: {self.path}"]
        title = f"Extracted {self.tuned_model.name} − {self.base_model.name} ({self.mode}): {len(self.modules)} modules"
        return Table(rows, title, notes)


def extract_adapter(base_model: str | Path, tuned_model: str | Path, out: str | Path, mode: str = "fixed",
                    linear_dim: int = 64, conv_dim: int = 32, linear_threshold: float = 0.0,
                    conv_threshold: float = 0.0, linear_ratio: float = 0.0, conv_ratio: float = 0.0,
                    linear_quantile: float = 1.0, conv_quantile: float = 1.0, text_encoder: bool = True,
                    save_precision: str = "fp16", device: str = "cpu", use_tucker: bool = False,
                    config: str | Path | None = None) -> ExtractReport:
    """Write the LoRA/LoCon that turns ``base_model`` into ``tuned_model`` (diffusers folders or single files) to
    ``out`` and report each module's rank and error. ``config`` is the diffusers folder single files need offline
    (as for :func:`lycolab.models.load.load_stable_diffusion`)."""
    from lycolab.models.load import load_stable_diffusion

    out = output_path(out)
    linear_parameter, conv_parameter = mode_parameters(mode, linear_dim, conv_dim, linear_threshold, conv_threshold,
                                                       linear_ratio, conv_ratio, linear_quantile, conv_quantile)
    dtype = save_dtype(save_precision)
    base = load_stable_diffusion(base_model, config=config)
    tuned = load_stable_diffusion(tuned_model, config=config)
    base_layers = model_layers(base.unet, base.text_encoders if text_encoder else [])
    tuned_layers = model_layers(tuned.unet, tuned.text_encoders if text_encoder else [])
    check_same_architecture(base_model, tuned_model, base_layers, tuned_layers)
    report = ExtractReport(out, Path(base_model), Path(tuned_model), mode)
    tensors: dict[str, torch.Tensor] = {}
    for name, base_layer in base_layers.items():
        base_weight, tuned_weight = base_layer.weight.detach(), tuned_layers[name].weight.detach()
        if torch.allclose(tuned_weight, base_weight):
            report.unchanged += 1
            continue
        shape = shape_of(base_layer)
        delta = (tuned_weight.float() - base_weight.float()).to(device)
        module_tensors, extracted = extract_module(name, delta, shape,
                                                   conv_parameter if shape.is_kxk else linear_parameter, mode,
                                                   use_tucker, dtype)
        tensors.update(module_tensors)
        report.modules.append(extracted)
    if not tensors:
        raise ToolError(f"{tuned_model}: every layer equals {base_model}'s; there is no difference to extract")
    metadata = extract_metadata(base, report, linear_dim, conv_dim, use_tucker)
    save_adapter_file(tensors, out, metadata, dtype)
    return report


def mode_parameters(mode: str, linear_dim: int, conv_dim: int, linear_threshold: float, conv_threshold: float,
                    linear_ratio: float, conv_ratio: float, linear_quantile: float, conv_quantile: float
                    ) -> tuple[float, float]:
    """(linear, conv) parameter of ``mode``, as extract_locon.py picks them; LyCORIS' asserts as errors."""
    parameters = {"fixed": (linear_dim, conv_dim), "threshold": (linear_threshold, conv_threshold),
                  "ratio": (linear_ratio, conv_ratio), "quantile": (linear_quantile, conv_quantile)}
    if mode not in parameters:
        raise ToolError(f"extract: mode {mode!r} is not one of {', '.join(EXTRACT_MODES)}")
    linear, conv = parameters[mode]
    for label, value in zip(("linear", "conv"), (linear, conv), strict=True):
        if mode == "fixed" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ToolError(f"extract: {label}_dim must be a whole number ≥ 1, not {value!r}")
        if mode == "threshold" and not value >= 0:
            raise ToolError(f"extract: {label}_threshold must be ≥ 0, not {value!r}")
        if mode in ("ratio", "quantile") and not 0 <= value <= 1:
            raise ToolError(f"extract: {label}_{mode} must be between 0 and 1, not {value!r}")
    return linear, conv


def model_layers(unet: nn.Module, text_encoders: list[nn.Module]) -> dict[str, nn.Module]:
    """Every Linear/Conv2d of the U-Net and text encoders under its kohya file name, each once."""
    roots = [(UNET_PREFIX, unet)]
    roots += [(text_encoder_prefix(index, len(text_encoders)), encoder) for index, encoder in enumerate(text_encoders)]
    layers = {}
    for prefix, root in roots:
        for path, module in canonical_named_modules(root):
            if path and isinstance(module, (nn.Linear, nn.Conv2d)):
                layers.setdefault(lora_name(prefix, path), module)
    return layers


def check_same_architecture(base_model, tuned_model, base_layers: dict[str, nn.Module],
                            tuned_layers: dict[str, nn.Module]) -> None:
    differing = [name for name, layer in base_layers.items()
                 if name not in tuned_layers or tuned_layers[name].weight.shape != layer.weight.shape]
    differing += [name for name in tuned_layers if name not in base_layers]
    if differing:
        raise ToolError(f"{tuned_model}: {len(differing)} layer(s) differ in name or shape from {base_model} (e.g. "
                        f"{differing[0]}); extract needs a fine-tune of that same base model")


@torch.no_grad()
def extract_module(name: str, delta: torch.Tensor, shape: LayerShape, parameter: float, mode: str, use_tucker: bool,
                   dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], ModuleExtract]:
    """LyCORIS' split of one layer's ΔW: U·S as up, Vh as down, and for a kxk conv with ``use_tucker`` the down
    split again (its (in, rank·k·k) transpose by SVD at the same rank) into a 1x1 down and a kxk core."""
    flat = delta.flatten(1)
    u, singular_values, vh = dense_svd(flat)
    rank = extract_rank(singular_values, mode, parameter, shape.out_features, shape.in_features)
    up, down = truncate(u, singular_values, vh, rank)
    mid = None
    if shape.is_kxk and use_tucker:
        down, mid = tucker_split(down, shape)
    tensors = lora_tensors(name, up, down, rank, shape, mid)
    error = relative_error(flat, written_delta(name, tensors, shape, dtype))
    kind = "linear" if not shape.is_conv else f"conv {shape.kernel[0]}x{shape.kernel[1]}"
    return tensors, ModuleExtract(name, kind, rank, error)


def tucker_split(down: torch.Tensor, shape: LayerShape) -> tuple[torch.Tensor, torch.Tensor]:
    """(1x1 down (rank, in), core (rank, rank, kh, kw)) with down[a, i, k] ≈ Σ_b core[a, b, k] · down1x1[b, i]."""
    rank = down.shape[0]
    kernel = down.reshape(rank, shape.in_features, *shape.kernel)
    per_input = kernel.transpose(0, 1).reshape(shape.in_features, -1)  # (in, rank·kh·kw)
    u, singular_values, vh = dense_svd(per_input)
    inner = min(shape.in_features, rank)
    columns, rows = truncate(u, singular_values, vh, inner)  # (in, inner), (inner, rank·kh·kw)
    core = rows.reshape(inner, rank, *shape.kernel).transpose(0, 1)  # (rank, inner, kh, kw)
    return columns.t(), core.contiguous()


def extract_metadata(base, report: ExtractReport, linear_dim: int, conv_dim: int, use_tucker: bool
                     ) -> dict[str, str]:
    """Minimum network metadata (sd-scripts' build_minimum_network_metadata keys) and where the file came from."""
    from lycolab.models.load import is_v2

    kxk = [module for module in report.modules if module.kind not in ("linear", "conv 1x1")]
    others = [module for module in report.modules if module.kind in ("linear", "conv 1x1")]
    fixed = report.mode == "fixed"
    dim = str(linear_dim) if fixed else common_value([module.rank for module in others])
    args = {}
    if kxk:
        conv = str(conv_dim) if fixed else common_value([module.rank for module in kxk])
        args = {"conv_dim": conv, "conv_alpha": conv}
    tucker = use_tucker and bool(kxk)
    if tucker:
        args = {"algo": "locon", **args, "use_tucker": "True"}
    version = SDXL_MODEL_VERSION if base.is_sdxl else ("sd_v2" if is_v2(base.unet) else "sd_v1")
    return {"ss_network_module": "lycoris.kohya" if tucker else "networks.lora", "ss_network_dim": dim,
            "ss_network_alpha": dim, "ss_network_args": json.dumps(args), "ss_v2": str(version == "sd_v2"),
            "ss_base_model_version": version,
            "ss_training_comment": f"extracted ({report.mode}) from {report.tuned_model.name} minus "
                                   f"{report.base_model.name}"}
