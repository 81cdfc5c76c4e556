"""Merging adapter files (lycolab.tools.merge_adapters): the merged file applied once equals the inputs applied at
their ratios — exactly for LoRA concatenation, within the reported error for the SVD merge."""

import copy
import json

import pytest
import torch
from test_tools_resize import (  # noqa: F401 (one_thread: an autouse fixture)
    EPS32,
    LoHaModule,
    LoKrModule,
    LoRAModule,
    file_deltas,
    float32_tolerance,
    one_thread,
    tiny_layers,
    write_adapter,
)

from lycolab.networks.io import read_adapter_file, save_adapter_file
from lycolab.networks.merge import merge_files
from lycolab.tools.merge_adapters import merge_adapters
from lycolab.tools.svd import ToolError


@pytest.fixture(scope="module")
def model():
    return tiny_layers()


def applied_weights(parts, sources) -> dict[str, torch.Tensor]:
    """Every adapted layer's weight after baking the files at their ratios into a copy of the model."""
    parts = copy.deepcopy(parts)
    merge_files(parts.unet, [parts.text_encoder], sources)
    return {name: module.weight.detach().clone() for name, module in tiny_layers_of(parts).items()}


def tiny_layers_of(parts):
    from lycolab.networks.io import adaptable_layers

    return {name: layer for name, layer in adaptable_layers(parts.unet, [parts.text_encoder]).items()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))}


def assert_same_application(parts, merged, sources):
    """Merged file at 1.0 vs inputs at their ratios, per layer: relative to ΔW, float32 rounding of the SVD/product
    plus that of adding ΔW to a weight ‖W‖/‖ΔW‖ times larger."""
    base = {name: layer.weight.detach() for name, layer in tiny_layers_of(parts).items()}
    expected, actual = applied_weights(parts, sources), applied_weights(parts, [(merged, 1.0)])
    for name, weight in expected.items():
        delta_norm = float((weight - base[name]).norm())
        if delta_norm == 0:
            continue
        tolerance = float32_tolerance(weight.shape) + 4 * EPS32 * float(weight.norm()) / delta_norm
        assert float((actual[name] - weight).norm()) / delta_norm <= tolerance, name


def test_lora_concat_merge_equals_applying_the_inputs_at_their_ratios(model, tmp_path):
    parts, layers = model
    linear_layers = {name: layer for name, layer in layers.items() if layer.weight.dim() == 2}
    first = write_adapter(tmp_path / "a.safetensors", layers, LoRAModule, 8, 4.0, seed=1, conv_dim=4, conv_alpha=1.0,
                          metadata={"ss_base_model_version": "sd_v1", "ss_v2": "False"})
    second = write_adapter(tmp_path / "b.safetensors", linear_layers, LoRAModule, 4, 1.0, seed=2)
    third = write_adapter(tmp_path / "c.safetensors", layers, LoRAModule, 2, 2.0, seed=3, use_tucker=True)
    sources = [(first, 0.7), (second, -0.4), (third, 1.3)]
    report = merge_adapters(sources, tmp_path / "merged.safetensors", save_precision="float")
    assert report.method == "concat"
    tensors, metadata = read_adapter_file(report.path)
    for module in report.modules:
        weight = layers[module.name].weight
        kxk = weight.dim() == 4 and weight.shape[2:] != (1, 1)
        expected_rank = (4 if kxk else 8) + (0 if module.name not in linear_layers else 4) + 2
        if kxk:  # the tucker input makes these an SVD at the summed rank, which cannot exceed ΔW's size
            expected_rank = min(expected_rank, weight.shape[0], weight[0].numel())
        assert module.rank == expected_rank == tensors[f"{module.name}.lora_down.weight"].shape[0]
        assert float(tensors[f"{module.name}.alpha"]) == module.rank  # scale 1: each input's scale is in its up
    assert_same_application(parts, report.path, sources)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["ss_v2"] == "False"
    assert "sshs_model_hash" in metadata


def test_svd_merge_of_lora_loha_and_lokr_is_within_the_reported_error(model, tmp_path):
    parts, layers = model
    sources = [(write_adapter(tmp_path / "lora.safetensors", layers, LoRAModule, 4, 2.0, seed=4), 0.5),
               (write_adapter(tmp_path / "loha.safetensors", layers, LoHaModule, 2, 1.0, seed=5), 1.0),
               (write_adapter(tmp_path / "lokr.safetensors", layers, LoKrModule, 2, 1.0, seed=6), -0.8)]
    report = merge_adapters(sources, tmp_path / "merged.safetensors", rank=4, conv_rank=2)
    assert report.method == "svd"
    inputs = [(file_deltas(path, parts), ratio) for path, ratio in sources]
    merged = file_deltas(report.path, parts)
    for module in report.modules:
        target = sum(deltas[module.name] * ratio for deltas, ratio in inputs)
        measured = float((merged[module.name] - target).norm() / target.norm())
        assert module.relative_error == pytest.approx(measured, abs=float32_tolerance(target.shape)), module.name
        out_features, in_features, *kernel = layers[module.name].weight.shape
        kxk = bool(kernel) and kernel != [1, 1]
        assert module.rank == min(2 if kxk else 4, out_features, in_features)
    _, metadata = read_adapter_file(report.path)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}


def test_mixed_merge_without_a_rank_keeps_every_direction(model, tmp_path):
    parts, layers = model
    sources = [(write_adapter(tmp_path / "lora.safetensors", layers, LoRAModule, 4, 2.0, seed=7), 0.6),
               (write_adapter(tmp_path / "loha.safetensors", layers, LoHaModule, 2, 1.0, seed=8), 0.9)]
    report = merge_adapters(sources, tmp_path / "merged.safetensors", save_precision="float")
    assert report.method == "svd"
    for module in report.modules:
        assert module.relative_error <= float32_tolerance(layers[module.name].weight.shape), module.name
    assert_same_application(parts, report.path, sources)


def test_merge_refuses_what_it_cannot_do_in_one_line(model, tmp_path):
    _, layers = model
    adapter = write_adapter(tmp_path / "a.safetensors", layers, LoRAModule, 2, 1.0)
    other_model = save_adapter_file({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 8, 3, 3),
                                     "lora_unet_conv_in.lora_up.weight": torch.ones(32, 2, 1, 1)},
                                    tmp_path / "sdxl.safetensors", {})
    with pytest.raises(ToolError, match="lora_unet_conv_in has different shapes in a.safetensors, sdxl.safetensors"):
        merge_adapters([(adapter, 1.0), (other_model, 1.0)], tmp_path / "m.safetensors")
    with pytest.raises(ToolError, match="at least one"):
        merge_adapters([], tmp_path / "m.safetensors")
    with pytest.raises(ToolError, match="rank must be a whole number"):
        merge_adapters([(adapter, 1.0)], tmp_path / "m.safetensors", rank=0)
    with pytest.raises(ToolError, match="not an \\(adapter file, ratio\\) pair"):
        merge_adapters([adapter], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
