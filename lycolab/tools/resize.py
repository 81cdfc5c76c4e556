"""Resizing an adapter to a lower rank, with sd-scripts' ``networks/resize_lora.py`` rules.

Each module's ΔW/scale is split by SVD and cut to the new rank — ``rank`` for Linear layers, ``conv_rank`` for
every conv (sd-scripts gives any 4-D ``lora_down`` the conv rank, 1x1 ones too), or per module by a dynamic rule
(``sv_ratio``, ``sv_fro``, ``sv_cumulative`` with ``dynamic_param``; ``rank`` then caps it). The new alpha is
scale × new rank, so the scale — and with it the learning-rate behaviour if training continues — is kept. Each module
reports what sd-scripts prints (Σ S retained, Frobenius norm retained, S[0]/S[rank-1]) and the error measured on
what was written (save precision included).

Where this differs from sd-scripts, on purpose: a LoRA is never made wider than it was (its ΔW has no further
directions, and sd-scripts' alpha would then no longer keep the scale); the SVD of a LoRA's up·down is taken from
its factors (the same singular values, far cheaper). Other algorithms — tucker LoCon, LoHa, LoKr — are resized
through their ΔW into a plain LoRA/LoCon file (scale 1: alpha = new rank), which every loader reads; modules of
algorithms lycolab cannot rebuild are refused by name.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lycolab.display import ShownAsTable, Table
from lycolab.networks.base import AdapterModule
from lycolab.networks.io import save_adapter_file
from lycolab.tools.svd import (
    DYNAMIC_METHODS,
    LayerShape,
    Retention,
    ToolError,
    common_value,
    dense_svd,
    factored_svd,
    flat_delta,
    format_alpha,
    is_plain_lora,
    lora_factors,
    lora_tensors,
    model_layers,
    output_path,
    percent,
    rebuild_adapter_file,
    relative_error,
    resize_rank,
    retention,
    save_dtype,
    shape_of,
    truncate,
    updated_network_args,
    written_delta,
)

TUCKER_ARGS = ("use_tucker", "use_cp", "use_conv_cp")


@dataclass
class ModuleResize:
    """One module's resize: ranks, the new alpha, what the cut kept, and the error of what was written."""

    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    retained: Retention
    relative_error: float  # ‖ΔW − ΔW written‖_F / ‖ΔW‖_F, as a loader rebuilds the saved tensors
    is_conv: bool = False  # 4-D: resized to conv_rank, as sd-scripts does
    is_kxk: bool = False  # a kxk conv: what ss_network_args' conv_dim/conv_alpha describe

    def line(self, dynamic: bool) -> str:
        """sd-scripts' ``--verbose`` line."""
        text = (f"{self.name:75} | sum(S) retained: {self.retained.sum_retained:.1%}, fro retained: "
                f"{self.retained.fro_retained:.1%}, max(S) ratio: {self.retained.max_ratio:0.1f}")
        return text + (f", dynamic | dim: {self.new_rank}, alpha: {self.new_alpha}" if dynamic else "")


@dataclass
class ResizeReport(ShownAsTable):
    """The written file and, per module, what the resize kept (the notebook shows it as a table)."""

    path: Path
    source: Path
    modules: list[ModuleResize] = field(default_factory=list)
    dynamic_method: str | None = None
    dynamic_param: float | None = None

    @property
    def fro_retained_mean(self) -> float:
        return statistics.fmean(module.retained.fro_retained for module in self.modules)

    @property
    def fro_retained_std(self) -> float:
        """Population standard deviation, as sd-scripts prints it (numpy's ``std``)."""
        return statistics.pstdev(module.retained.fro_retained for module in self.modules)

    def table(self) -> Table:
        rows = [{"module": module.name, "rank": f"{module.old_rank} → {module.new_rank}",
                 "alpha": format_alpha(module.new_alpha), "sum(S) retained": percent(module.retained.sum_retained),
                 "fro retained": percent(module.retained.fro_retained),
                 "max(S) ratio": f"{module.retained.max_ratio:0.1f}", "error": f"{module.relative_error:.2e}"}
                for module in self.modules]
        method = f" ({self.dynamic_method}: {self.dynamic_param})" if self.dynamic_method else ""
        notes = [f"Average Frobenius norm retention: {self.fro_retained_mean:.2%} | std: {self.fro_retained_std:0.3f}",
                 f"written: {self.path}"]
        return Table(rows, f"Resized {self.source.name}{method}: {len(self.modules)} modules", notes)


def resize_adapter(source: str | Path, out: str | Path, rank: int | None = None, conv_rank: int | None = None,
                   dynamic_method: str | None = None, dynamic_param: float | None = None,
                   save_precision: str = "fp16", device: str = "cpu", verbose: bool = False,
                   base_model: str | Path | None = None) -> ResizeReport:
    """Write ``source`` at a lower rank to ``out`` (``.safetensors``, atomically) and report each module's cut.

    ``conv_rank`` defaults to ``rank``. With ``dynamic_method`` each module gets its own rank (at most ``rank``
    when given). ``base_model`` is needed only for LoHa/LoKr files whose layer kinds their tensors and names do not
    tell (see :mod:`lycolab.tools.svd`).
    """
    source, out = Path(source), output_path(out)
    check_resize_arguments(rank, conv_rank, dynamic_method, dynamic_param)
    conv_rank = rank if conv_rank is None else conv_rank
    dtype = save_dtype(save_precision)
    adapter_file = rebuild_adapter_file(source, model_layers(base_model) if base_model else None, device)
    tensors: dict[str, torch.Tensor] = {}
    report = ResizeReport(out, source, dynamic_method=dynamic_method, dynamic_param=dynamic_param)
    for name, adapter in adapter_file.modules.items():
        shape = shape_of(adapter.org_module)
        module_tensors, resized = resize_module(name, adapter, shape, conv_rank if shape.is_conv else rank,
                                                dynamic_method, dynamic_param, dtype)
        tensors.update(module_tensors)
        report.modules.append(resized)
        if verbose:
            print(resized.line(bool(dynamic_method)))
    only_lora = all(adapter.algo == "lora" for adapter in adapter_file.modules.values())
    metadata = resized_metadata(adapter_file.metadata, report.modules, rank, conv_rank, dynamic_method,
                                dynamic_param, only_lora)
    save_adapter_file(tensors, out, metadata, dtype)
    if verbose:
        print(report.table().notes[0])
    return report


def check_resize_arguments(rank: int | None, conv_rank: int | None, dynamic_method: str | None,
                           dynamic_param: float | None) -> None:
    if rank is None and dynamic_method is None:
        raise ToolError(f"resize: give rank= (the new rank) or dynamic_method= ({', '.join(DYNAMIC_METHODS)})")
    for label, value in (("rank", rank), ("conv_rank", conv_rank)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ToolError(f"resize: {label} must be a whole number ≥ 1, not {value!r}")
    if dynamic_method is None:
        return
    if dynamic_method not in DYNAMIC_METHODS:
        raise ToolError(f"resize: dynamic_method {dynamic_method!r} is not one of {', '.join(DYNAMIC_METHODS)}")
    if dynamic_param is None or not float(dynamic_param) > 0:
        raise ToolError(f"resize: dynamic_method {dynamic_method} needs dynamic_param > 0 (e.g. 0.9 for sv_fro)")
    if dynamic_method != "sv_ratio" and float(dynamic_param) > 1:
        raise ToolError(f"resize: {dynamic_method}'s dynamic_param is a fraction in (0, 1], not {dynamic_param}")


@torch.no_grad()
def resize_module(name: str, adapter: AdapterModule, shape: LayerShape, max_rank: int | None,
                  dynamic_method: str | None, dynamic_param: float | None, dtype: torch.dtype
                  ) -> tuple[dict[str, torch.Tensor], ModuleResize]:
    """The cut of one module: LoRA inputs keep their scale (SVD of up·down); others are split at scale 1."""
    lora = adapter.algo == "lora"
    kept_scale = adapter.scale if lora else 1.0
    if is_plain_lora(adapter):
        u, singular_values, vh = factored_svd(*lora_factors(adapter))
    else:
        u, singular_values, vh = dense_svd(flat_delta(adapter) / kept_scale)
    bound = min(singular_values.numel(), adapter.dim) if lora else singular_values.numel()
    new_rank = min(resize_rank(singular_values, max_rank, dynamic_method, dynamic_param), bound)
    up, down = truncate(u, singular_values, vh, new_rank)
    new_alpha = kept_scale * new_rank
    tensors = lora_tensors(name, up, down, new_alpha, shape)
    error = relative_error(flat_delta(adapter), written_delta(name, tensors, shape, dtype))
    return tensors, ModuleResize(name, adapter.dim, new_rank, new_alpha, retention(singular_values, new_rank), error,
                                 shape.is_conv, shape.is_kxk)


def resized_metadata(metadata: dict[str, str], modules: list[ModuleResize], rank: int | None, conv_rank: int | None,
                     dynamic_method: str | None, dynamic_param: float | None, only_lora: bool) -> dict[str, str]:
    """sd-scripts' updates (``ss_training_comment``, ``ss_network_dim``/``_alpha``; the hashes are recomputed on
    save), plus ``ss_network_args`` kept true: new conv dims, and no tucker or other-algorithm arguments."""
    metadata = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    comment = metadata.get("ss_training_comment", "")
    old_dim = max(module.old_rank for module in modules)
    convs = [module for module in modules if module.is_kxk]
    linears = [module for module in modules if not module.is_conv] or modules
    if dynamic_method:
        metadata["ss_training_comment"] = f"Dynamic resize with {dynamic_method}: {dynamic_param} from {old_dim}; " \
                                          f"{comment}"
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = "Dynamic"
    else:
        conv_description = "" if rank == conv_rank else f" (conv: {conv_rank})"
        metadata["ss_training_comment"] = f"dimension is resized from {old_dim} to {rank}{conv_description}; " \
                                          f"{comment}"
        metadata["ss_network_dim"] = str(rank)
        metadata["ss_network_alpha"] = common_value([float(module.new_alpha) for module in linears])
    had_conv_args = "conv_dim" in metadata.get("ss_network_args", "")
    if not only_lora:
        metadata["ss_network_module"] = "networks.lora"
        metadata["ss_network_args"] = "{}"
    write_convs = bool(convs) and (had_conv_args or not only_lora)
    conv_dim = (common_value([module.new_rank for module in convs]) if dynamic_method else conv_rank) \
        if write_convs else None
    conv_alpha = conv_dim if write_convs and not only_lora else \
        common_value([float(module.new_alpha) for module in convs]) if write_convs else None  # scale 1 / kept
    args = updated_network_args(metadata, conv_dim, conv_alpha, drop=TUCKER_ARGS)
    metadata["ss_network_args"] = args
    return metadata
