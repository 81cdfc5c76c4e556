"""Merging several adapter files into one, each at its ratio: ΔW = Σ ratio_i · ΔW_i per module.

When every input is LoRA/LoCon and no rank is asked for, the factors are concatenated (sd-scripts'
``merge_lora.py --concat``): ranks add up and the result is exact. sd-scripts keeps the first file's alpha and
scales both factors by sqrt(alpha_i / alpha_0)·ratio, which changes ΔW whenever ranks or alphas differ; here each
file's scale alpha_i/rank_i and ratio go into its ``lora_up`` and the merged alpha is the merged rank (scale 1), so
merged == applied side by side, to float rounding. A module whose inputs are not all plain factors (a tucker
LoCon) is split by SVD at the summed rank instead, which is just as exact.

Otherwise — LoHa/LoKr among the inputs, or ``rank`` given — each module's summed ΔW is split by SVD (sd-scripts'
``svd_merge_lora.py``): ``rank`` for Linear layers and 1x1 convs, ``conv_rank`` (default ``rank``) for kxk convs,
clamped to min(out, in channels) as there; with no rank, at ΔW's numerical rank (nothing above float32 rounding
lost). alpha = rank. sd-scripts' clamp of the factors to their 99th percentile is left out: it adds error the
report could not account for. Each module reports the relative error of ΔW as written (save precision included).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lycolab.display import ShownAsTable, Table
from lycolab.networks.base import AdapterModule
from lycolab.networks.io import save_adapter_file
from lycolab.tools.svd import (
    AdapterFile,
    LayerShape,
    ToolError,
    common_value,
    dense_svd,
    flat_delta,
    is_plain_lora,
    lora_factors,
    lora_tensors,
    model_layers,
    numerical_rank,
    output_path,
    rebuild_adapter_file,
    relative_error,
    save_dtype,
    shape_of,
    truncate,
    written_delta,
)


@dataclass
class ModuleMerge:
    name: str
    method: str  # "concat" (factors side by side) or "svd"
    rank: int
    inputs: int  # how many of the files adapt this layer
    relative_error: float  # ‖Σ ratio_i·ΔW_i − ΔW written‖_F / ‖Σ ratio_i·ΔW_i‖_F
    is_kxk: bool = False


@dataclass
class MergeReport(ShownAsTable):
    path: Path
    sources: list[tuple[Path, float]]
    method: str  # "concat" or "svd"
    modules: list[ModuleMerge] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((module.relative_error for module in self.modules), default=0.0)

    def table(self) -> Table:
        rows = [{"module": module.name, "method": module.method, "rank": module.rank, "inputs": module.inputs,
                 "error": f"{module.relative_error:.2e}"} for module in self.modules]
        mean = statistics.fmean(module.relative_error for module in self.modules) if self.modules else 0.0
        inputs = ", ".join(f"{path.name} × {ratio:g}" for path, ratio in self.sources)
        notes = [f"inputs: {inputs}", f"relative error of ΔW: mean {mean:.2e}, max {self.max_error:.2e}",
                 f"written: {self.path}"]
        return Table(rows, f"Merged {len(self.sources)} adapters ({self.method}): {len(self.modules)} modules", notes)


def merge_adapters(sources: list[tuple[str | Path, float]], out: str | Path, rank: int | None = None,
                   conv_rank: int | None = None, save_precision: str = "fp16", device: str = "cpu",
                   base_model: str | Path | None = None) -> MergeReport:
    """Write one adapter equal to applying every ``(file, ratio)`` of ``sources`` together, to ``out``.

    ``base_model`` is needed only for LoHa/LoKr files whose layer kinds their tensors and names do not tell (see
    :mod:`lycolab.tools.svd`).
    """
    out = output_path(out)
    sources = check_merge_arguments(sources, rank, conv_rank)
    dtype = save_dtype(save_precision)
    layers = model_layers(base_model) if base_model else None
    files = [(rebuild_adapter_file(path, layers, device), ratio) for path, ratio in sources]
    concat = rank is None and all(adapter.algo == "lora" for adapter_file, _ in files
                                  for adapter in adapter_file.modules.values())
    report = MergeReport(out, sources, "concat" if concat else "svd")
    tensors: dict[str, torch.Tensor] = {}
    for name in module_names(files):
        entries = [(adapter_file.modules[name], ratio) for adapter_file, ratio in files if name in adapter_file.modules]
        shape = merged_shape(name, entries, files)
        module_rank = None if concat else (conv_rank if shape.is_kxk and conv_rank is not None else rank)
        module_tensors, merged = merge_module(name, entries, shape, concat, module_rank, dtype)
        tensors.update(module_tensors)
        report.modules.append(merged)
    save_adapter_file(tensors, out, merged_metadata(files, report, rank, conv_rank), dtype)
    return report


def check_merge_arguments(sources, rank: int | None, conv_rank: int | None) -> list[tuple[Path, float]]:
    if not sources:
        raise ToolError("merge: give at least one (adapter file, ratio) pair")
    checked = []
    for item in sources:
        try:
            path, ratio = item
            checked.append((Path(path), float(ratio)))
        except (TypeError, ValueError):
            raise ToolError(f"merge: {item!r} is not an (adapter file, ratio) pair") from None
    for label, value in (("rank", rank), ("conv_rank", conv_rank)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ToolError(f"merge: {label} must be a whole number ≥ 1, not {value!r}")
    return checked


def module_names(files: list[tuple[AdapterFile, float]]) -> list[str]:
    """Every module of any input, in first-seen order."""
    names: dict[str, None] = {}
    for adapter_file, _ in files:
        names.update(dict.fromkeys(adapter_file.modules))
    return list(names)


def merged_shape(name: str, entries: list[tuple[AdapterModule, float]], files) -> LayerShape:
    """The layer all inputs adapt: the same (out, in·k·k) in every file; a conv's shape wins over a flat one."""
    shapes = [shape_of(adapter.org_module) for adapter, _ in entries]
    flat = {(shape.out_features, shape.in_features * max(1, _kernel_size(shape))) for shape in shapes}
    if len(flat) > 1:
        paths = [adapter_file.path.name for adapter_file, _ in files if name in adapter_file.modules]
        raise ToolError(f"merge: {name} has different shapes in {', '.join(paths)} ({sorted(flat)}); the adapters "
                        "are for different base models (SD 1.x / 2.x / SDXL) and cannot be merged")
    return max(shapes, key=lambda shape: len(shape.kernel))


def _kernel_size(shape: LayerShape) -> int:
    return shape.kernel[0] * shape.kernel[1] if shape.is_conv else 1


@torch.no_grad()
def merge_module(name: str, entries: list[tuple[AdapterModule, float]], shape: LayerShape, concat: bool,
                 rank: int | None, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], ModuleMerge]:
    target = sum(flat_delta(adapter) * ratio for adapter, ratio in entries)
    if concat and all(is_plain_lora(adapter) for adapter, _ in entries):
        method = "concat"
        ups, downs = zip(*(lora_factors(adapter) for adapter, _ in entries), strict=True)
        up = torch.cat([up * (adapter.scale * ratio) for up, (adapter, ratio) in zip(ups, entries, strict=True)], 1)
        down = torch.cat(downs, 0)
    else:
        method = "concat" if concat else "svd"
        u, singular_values, vh = dense_svd(target)
        if concat:
            new_rank = min(sum(adapter.dim for adapter, _ in entries), singular_values.numel())
        elif rank is None:
            new_rank = numerical_rank(singular_values, *target.shape)
        else:
            new_rank = min(rank, shape.out_features, shape.in_features)
        up, down = truncate(u, singular_values, vh, new_rank)
    tensors = lora_tensors(name, up, down, down.shape[0], shape)
    error = relative_error(target, written_delta(name, tensors, shape, dtype))
    return tensors, ModuleMerge(name, method, down.shape[0], len(entries), error, shape.is_kxk)


def merged_metadata(files: list[tuple[AdapterFile, float]], report: MergeReport, rank: int | None,
                    conv_rank: int | None) -> dict[str, str]:
    """sd-scripts' minimum network metadata: ``ss_v2`` and ``ss_base_model_version`` from the first file that has
    them, ``networks.lora``, the dims (``Dynamic`` when they differ) and conv dims in ``ss_network_args``."""
    metadata = {"ss_network_module": "networks.lora"}
    for key in ("ss_v2", "ss_base_model_version"):
        value = next((adapter_file.metadata[key] for adapter_file, _ in files if key in adapter_file.metadata), None)
        if value is not None:
            metadata[key] = value
    linears = [module.rank for module in report.modules if not module.is_kxk]
    convs = [module.rank for module in report.modules if module.is_kxk]
    dim = str(rank) if rank is not None else common_value(linears or convs)
    metadata["ss_network_dim"] = metadata["ss_network_alpha"] = dim
    args = {}
    if convs:
        conv = str(conv_rank if conv_rank is not None else rank) if rank is not None else common_value(convs)
        args = {"conv_dim": conv, "conv_alpha": conv}
    metadata["ss_network_args"] = json.dumps(args)
    inputs = ", ".join(f"{adapter_file.path.name} × {ratio:g}" for adapter_file, ratio in files)
    metadata["ss_training_comment"] = f"merged ({report.method}) from {inputs}"
    return metadata
