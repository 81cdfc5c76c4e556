"""Resizing adapters (lycolab.tools.resize): sd-scripts' rank rules and metadata, and the retained norms it reports
are the ones measured on ΔW before and after."""

import json

import pytest
import torch
from torch import nn

from lycolab.models.tiny import build_tiny_sd
from lycolab.networks.algorithms.loha import LoHaModule
from lycolab.networks.algorithms.lokr import LoKrModule
from lycolab.networks.algorithms.lora import LoRAModule
from lycolab.networks.io import (
    AdapterFileError,
    adaptable_layers,
    load_network,
    model_hashes,
    read_adapter_file,
    save_adapter_file,
)
from lycolab.tools.resize import resize_adapter
from lycolab.tools.svd import ToolError, dynamic_rank, resize_rank

EPS32 = torch.finfo(torch.float32).eps
__all__ = ["float32_tolerance", "tiny_layers", "write_adapter", "LoHaModule", "LoKrModule", "LoRAModule"]


def float32_tolerance(shape) -> float:
    """Relative rounding of a float32 SVD/product of this size: eps times the largest dimension (numpy's
    ``matrix_rank`` tolerance), doubled for the two factorizations (input rebuild and output) compared."""
    return 2 * EPS32 * max(shape[0], int(torch.tensor(shape[1:]).prod()))


def tiny_layers():
    """The tiny SD's model and its layers under file names: Linear, 1x1 and 3x3 convs, U-Net and text encoder."""
    parts = build_tiny_sd(pretrained=False)
    layers = adaptable_layers(parts.unet, [parts.text_encoder])
    return parts, {name: layer for name, layer in layers.items() if isinstance(layer, (nn.Linear, nn.Conv2d))}


def write_adapter(path, layers, module_class, dim, alpha, seed=0, metadata=None, conv_dim=None, conv_alpha=None,
                  **options):
    """An adapter file with random non-zero factors for every layer (kxk convs at ``conv_dim`` when given)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in layers.items():
        kxk = layer.weight.dim() == 4 and layer.weight.shape[2:] != (1, 1)
        rank, module_alpha = (conv_dim, conv_alpha) if kxk and conv_dim else (dim, alpha)
        module = module_class(name, layer, rank, module_alpha, **options)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        tensors.update({f"{name}.{key}": value for key, value in module.state_dict().items()})
    return save_adapter_file(tensors, path, metadata or {}, torch.float32)


def file_deltas(path, parts) -> dict[str, torch.Tensor]:
    """ΔW of every module of a file, as lycolab's loader rebuilds it against the model."""
    network = load_network(path, parts.unet, [parts.text_encoder], apply=False)
    with torch.no_grad():
        return {adapter.lora_name: adapter.delta_weight().float() for adapter in network.adapters}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared CPU their spin-waits cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_layers()


@pytest.fixture(scope="module")
def locon_file(model, tmp_path_factory):
    _, layers = model
    path = tmp_path_factory.mktemp("resize") / "locon.safetensors"
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
                "ss_network_args": json.dumps({"conv_dim": "6", "conv_alpha": "3"}), "ss_training_comment": "mine"}
    return write_adapter(path, layers, LoRAModule, 8, 4.0, metadata=metadata, conv_dim=6, conv_alpha=3.0)


def test_reported_frobenius_retention_is_the_measured_norm_ratio_of_delta_weights(model, locon_file, tmp_path):
    parts, _ = model
    report = resize_adapter(locon_file, tmp_path / "small.safetensors", rank=4, conv_rank=2, save_precision="float")
    before, after = file_deltas(locon_file, parts), file_deltas(report.path, parts)
    assert {module.name for module in report.modules} == set(before) == set(after)
    for module in report.modules:
        old, new = before[module.name], after[module.name]
        tolerance = float32_tolerance(old.shape)
        measured_retained = float(new.norm() / old.norm())
        measured_error = float((old - new).norm() / old.norm())
        assert module.retained.fro_retained == pytest.approx(measured_retained, abs=tolerance), module.name
        assert module.relative_error == pytest.approx(measured_error, abs=tolerance), module.name
        assert module.retained.relative_error == pytest.approx(measured_error, abs=tolerance), module.name


def test_fixed_resize_keeps_each_scale_and_writes_sd_scripts_metadata(model, locon_file, tmp_path):
    _, layers = model
    report = resize_adapter(locon_file, tmp_path / "small.safetensors", rank=4, conv_rank=2)
    tensors, metadata = read_adapter_file(report.path)
    for name, layer in layers.items():
        conv = layer.weight.dim() == 4  # sd-scripts gives every 4-D lora_down (1x1 too) the conv rank
        kxk = conv and layer.weight.shape[2:] != (1, 1)
        old_scale = 3.0 / 6 if kxk else 4.0 / 8
        new_rank = 2 if conv else 4
        assert tensors[f"{name}.lora_down.weight"].shape[0] == new_rank
        assert tensors[f"{name}.lora_down.weight"].dim() == layer.weight.dim()
        assert float(tensors[f"{name}.alpha"]) == old_scale * new_rank
    assert metadata["ss_training_comment"] == "dimension is resized from 8 to 4 (conv: 2); mine"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    ss_metadata = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    stored = {key: value for key, value in tensors.items()}
    assert model_hashes(stored, ss_metadata) == {key: metadata[key] for key in ("sshs_model_hash", "sshs_legacy_hash")}
    assert all(value.dtype == torch.float16 for value in tensors.values())


def test_sd_scripts_dynamic_rank_rules():
    # S = 4, 2, 1, 0.5. sd-scripts counts (or searches) an index, clamps it to [1, len(S) - 1] and adds one:
    # sv_ratio 3: S > 4/3 → 2 values → rank 3; sv_ratio 10: all 4 → clamp 3 → rank 4.
    # sv_fro 0.9: cumulative S²/ΣS² = .753 .941 .988 1 reaches 0.81 at index 1, +1 → 2, +1 → rank 3.
    # sv_cumulative 0.5: cumulative S/ΣS = .533 .8 .933 1 reaches 0.5 at index 0, +1 → 1, +1 → rank 2.
    singular_values = torch.tensor([4.0, 2.0, 1.0, 0.5])
    assert dynamic_rank(singular_values, "sv_ratio", 3.0) == 3
    assert dynamic_rank(singular_values, "sv_ratio", 10.0) == 4
    assert dynamic_rank(singular_values, "sv_fro", 0.9) == 3
    assert dynamic_rank(singular_values, "sv_cumulative", 0.5) == 2
    assert resize_rank(singular_values, 2, "sv_fro", 0.9) == 2  # rank caps the dynamic choice
    assert resize_rank(torch.zeros(4), 8, None, None) == 1  # a zero ΔW keeps rank 1


def test_dynamic_resize_picks_ranks_per_module_and_marks_metadata_dynamic(model, locon_file, tmp_path):
    report = resize_adapter(locon_file, tmp_path / "dynamic.safetensors", dynamic_method="sv_fro", dynamic_param=0.9)
    tensors, metadata = read_adapter_file(report.path)
    for module in report.modules:
        assert module.retained.fro_retained >= 0.9 or module.new_rank == module.old_rank
        assert tensors[f"{module.name}.lora_down.weight"].shape[0] == module.new_rank <= module.old_rank
        assert module.new_alpha == pytest.approx(module.new_rank * 0.5)  # both scales are 0.5: 4/8 and 3/6
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "Dynamic"
    assert metadata["ss_training_comment"] == "Dynamic resize with sv_fro: 0.9 from 8; mine"
    assert "Average Frobenius norm retention" in str(report)


@pytest.mark.parametrize("module_class", [LoHaModule, LoKrModule], ids=["loha", "lokr"])
def test_other_algorithms_resize_into_a_lora_within_the_reported_error(model, module_class, tmp_path):
    parts, layers = model
    source = write_adapter(tmp_path / "in.safetensors", layers, module_class, 4, 2.0,
                           metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "x"}'})
    report = resize_adapter(source, tmp_path / "out.safetensors", rank=8, save_precision="float")
    tensors, metadata = read_adapter_file(report.path)
    assert {key.split(".", 1)[1] for key in tensors} == {"lora_up.weight", "lora_down.weight", "alpha"}
    assert metadata["ss_network_module"] == "networks.lora" and "algo" not in metadata["ss_network_args"]
    before, after = file_deltas(source, parts), file_deltas(report.path, parts)
    for module in report.modules:
        old, new = before[module.name], after[module.name]
        measured = float((old - new).norm() / old.norm())
        assert module.relative_error == pytest.approx(measured, abs=float32_tolerance(old.shape)), module.name
        assert new.shape == old.shape


def test_resize_refuses_what_it_cannot_do_in_one_line(model, locon_file, tmp_path):
    with pytest.raises(ToolError, match="give rank= .* or dynamic_method="):
        resize_adapter(locon_file, tmp_path / "a.safetensors")
    with pytest.raises(ToolError, match="not one of sv_ratio"):
        resize_adapter(locon_file, tmp_path / "a.safetensors", dynamic_method="svd", dynamic_param=0.5)
    with pytest.raises(ToolError, match="needs dynamic_param"):
        resize_adapter(locon_file, tmp_path / "a.safetensors", dynamic_method="sv_fro")
    with pytest.raises(ToolError, match=r"\.safetensors"):
        resize_adapter(locon_file, tmp_path / "a.ckpt", rank=2)
    unknown = save_adapter_file({"lora_unet_conv_in.mystery": torch.ones(3)}, tmp_path / "odd.safetensors", {})
    with pytest.raises(AdapterFileError, match="odd.safetensors: module lora_unet_conv_in .*known algorithm"):
        resize_adapter(unknown, tmp_path / "a.safetensors", rank=2)
    assert not (tmp_path / "a.safetensors").exists()
