"""Baking adapters into the model's weights: W ← W + ratio · ΔW, for one network or several files with ratios.

A merged model runs at the base model's speed and can be exported as a checkpoint; ΔW follows each algorithm's
forward exactly (the reference LyCORIS 4.1.3 merge scales LoHa by alpha/dim twice; this does not).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from lycolab.networks.io import load_network
from lycolab.networks.network import AdapterNetwork


@torch.no_grad()
def merge_network(network: AdapterNetwork, ratio: float | None = None) -> int:
    """Add ``ratio · ΔW`` (each adapter's multiplier when ``ratio`` is None) to every wrapped layer's weight, then
    detach the network so the layers run their own forward again; ``train_norm`` offsets are added to their norm
    layers' weight and bias. Returns the number of layers changed."""
    network.restore()
    for adapter in network.adapters:
        weight = adapter.org_module.weight
        factor = adapter.multiplier if ratio is None else ratio
        delta = adapter.weight_change(factor).to(weight.device, torch.float32)  # DoRA/OFT: not linear in factor
        weight.copy_((weight.float() + delta.reshape(weight.shape)).to(weight.dtype))
        _merge_bias(adapter, factor)
    for norm in network.norm_adapters:  # train_norm: the offsets join the layer's own scale and shift
        factor = norm.multiplier if ratio is None else ratio
        for target, offset in ((norm.org_module.weight, norm.w_norm), (norm.org_module.bias, norm.b_norm)):
            target.copy_((target.float() + offset.to(target.device, torch.float32) * factor).to(target.dtype))
    return len(network.modules_applied)


def _merge_bias(adapter, factor: float) -> None:
    """An adapter that trains the bias too (full's ``diff_b``) adds it; a layer without a bias gets one, as in
    LyCORIS' merge."""
    delta = adapter.delta_bias()
    if delta is None:
        return
    layer = adapter.org_module
    delta = delta.to(layer.weight.device, torch.float32).reshape(-1) * factor
    if layer.bias is None:
        layer.bias = nn.Parameter(delta.to(layer.weight.dtype), requires_grad=False)
    else:
        layer.bias.copy_((layer.bias.float() + delta).to(layer.bias.dtype))


def merge_files(unet: nn.Module | None, text_encoders: list[nn.Module] | None,
                files_and_ratios: Iterable[tuple[str | Path, float]]) -> list[Path]:
    """Bake each adapter file at its ratio into the U-Net / text encoders, in order; returns the files merged."""
    merged = []
    for path, ratio in files_and_ratios:
        network = load_network(path, unet, text_encoders, multiplier=ratio, apply=False)
        merge_network(network)
        merged.append(Path(path))
    return merged
