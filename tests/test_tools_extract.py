"""Extracting a LoRA/LoCon from two models (lycolab.tools.extract): LyCORIS' rank rules and factors, and the
extracted adapter applied to the base gives the fine-tuned model within the error it reports."""

import logging

import pytest
import torch
from lycoris.utils import extract_conv, extract_diff, extract_linear
from test_tools_resize import float32_tolerance, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from torch import nn

from lycolab.models.export import export_single_file
from lycolab.models.load import load_stable_diffusion
from lycolab.models.tiny import build_tiny_sd, save_tiny_parts
from lycolab.networks.io import load_network
from lycolab.networks.merge import merge_network
from lycolab.tools.extract import extract_adapter, extract_module, model_layers
from lycolab.tools.svd import LayerShape, ToolError, extract_rank

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
TRUE_RANK = 2
FP16_UNIT_ROUNDOFF = 2.0 ** -11


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny SD as a diffusers folder, and a "fine-tune" of it as a float32 single file: every layer plus a
    known rank-2 ΔW plus a little noise (returned per layer, to bound what an extraction can miss)."""
    root = tmp_path_factory.mktemp("extract")
    parts = build_tiny_sd(pretrained=False)
    base = save_tiny_parts(parts, root / "base")
    generator = torch.Generator().manual_seed(7)
    noise_fraction = {}
    with torch.no_grad():
        for name, layer in model_layers(parts.unet, [parts.text_encoder]).items():
            weight = layer.weight
            low_rank = (torch.randn(weight.shape[0], TRUE_RANK, generator=generator)
                        @ torch.randn(TRUE_RANK, weight[0].numel(), generator=generator)).reshape(weight.shape) * 0.05
            noise = torch.randn(weight.shape, generator=generator) * 1e-4
            noise_fraction[name] = float(noise.norm() / (low_rank + noise).norm())
            weight.add_(low_rank + noise)
    tuned = export_single_file(parts.unet, parts.vae, parts.text_encoder, root / "tuned.safetensors", dtype=None)
    return base, tuned, noise_fraction


def test_extracted_adapter_applied_to_base_reproduces_the_tuned_model_within_the_reported_error(models, tmp_path):
    base, tuned, noise_fraction = models
    report = extract_adapter(base, tuned, tmp_path / "extracted.safetensors", linear_dim=TRUE_RANK,
                             conv_dim=TRUE_RANK, config=base)
    assert report.unchanged == 0 and len(report.modules) == len(noise_fraction)
    base_parts, tuned_parts = load_stable_diffusion(base), load_stable_diffusion(tuned, config=base)
    base_layers = model_layers(base_parts.unet, base_parts.text_encoders)
    tuned_layers = model_layers(tuned_parts.unet, tuned_parts.text_encoders)
    original = {name: layer.weight.detach().clone() for name, layer in base_layers.items()}
    merge_network(load_network(report.path, base_parts.unet, base_parts.text_encoders, apply=False), ratio=1.0)
    for module in report.modules:
        merged, target = base_layers[module.name].weight.detach(), tuned_layers[module.name].weight.detach()
        difference_norm = float((target - original[module.name]).norm())
        measured = float((merged - target).norm()) / difference_norm
        # the merge adds ΔW to weights ‖W‖/‖ΔW‖ times larger: float32 rounding of that sum, plus the SVD's
        rounding = 4 * torch.finfo(torch.float32).eps * float(target.norm()) / difference_norm
        assert module.relative_error == pytest.approx(measured, abs=rounding + float32_tolerance(target.shape))
        # Eckart–Young: the rank-2 cut of (ΔW + noise) misses at most the noise; fp16 factors add (1+√r)·u
        bound = noise_fraction[module.name] + (1 + TRUE_RANK ** 0.5) * FP16_UNIT_ROUNDOFF
        assert module.relative_error <= bound, module.name


def test_ranks_clamp_to_the_layer_as_lycoris_and_full_rank_is_exact(models, tmp_path):
    base, tuned, noise_fraction = models
    report = extract_adapter(base, tuned, tmp_path / "full.safetensors", linear_dim=10_000, conv_dim=10_000,
                             save_precision="float", text_encoder=False, config=base)
    layers = model_layers(load_stable_diffusion(base).unet, [])
    assert {module.name for module in report.modules} == set(layers)
    for module in report.modules:
        out_features, in_features, *kernel = layers[module.name].weight.shape
        assert module.rank == min(out_features, in_features)
        if module.kind == "conv 3x3":  # min(out, in channels) can be below the flattened rank: noise is cut
            assert module.relative_error <= noise_fraction[module.name] + float32_tolerance((out_features, 9))
        else:
            assert module.relative_error <= float32_tolerance((out_features, in_features))


def spectrum_matrix(generator, out_features, flat_in, decay=0.7):
    """A matrix with singular values decay^i, so each mode's rank is well inside the layer."""
    size = min(out_features, flat_in)
    u, _ = torch.linalg.qr(torch.randn(out_features, size, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(flat_in, size, generator=generator))
    return (u * decay ** torch.arange(size, dtype=torch.float32)) @ v.t()


@pytest.mark.parametrize(("mode", "parameter"), [("fixed", 3), ("threshold", 0.05), ("ratio", 0.3),
                                                 ("quantile", 0.5), ("quantile", 0.9)])
def test_mode_ranks_and_factors_match_lycoris(mode, parameter):
    generator = torch.Generator().manual_seed(3)
    for shape in (LayerShape(48, 40), LayerShape(48, 16, (3, 3)), LayerShape(48, 16, (1, 1))):
        delta = spectrum_matrix(generator, shape.out_features, shape.in_features * 9 if shape.is_kxk else
                                shape.in_features).reshape(shape.weight_shape)
        reference = extract_conv if shape.is_conv else extract_linear
        (down, up, _), kind = reference(delta, mode, parameter)
        assert kind == "low rank"
        singular_values = torch.linalg.svdvals(delta.flatten(1))
        assert extract_rank(singular_values, mode, parameter, shape.out_features, shape.in_features) == down.shape[0]
        tensors, _ = extract_module("m", delta, shape, parameter, mode, False, torch.float32)
        torch.testing.assert_close(tensors["m.lora_down.weight"], down.reshape(tensors["m.lora_down.weight"].shape))
        torch.testing.assert_close(tensors["m.lora_up.weight"], up.reshape(tensors["m.lora_up.weight"].shape))


def test_tucker_extraction_matches_lycoris_cp_form():
    torch.manual_seed(0)
    base_unet, tuned_unet = nn.Sequential(nn.Conv2d(16, 48, 3)), nn.Sequential(nn.Conv2d(16, 48, 3))
    base_encoder, tuned_encoder = nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 8))
    tuned_encoder.load_state_dict(base_encoder.state_dict())
    reference = extract_diff([base_encoder], [tuned_encoder], base_unet, tuned_unet, "fixed", 4, 4)
    delta = tuned_unet[0].weight.detach() - base_unet[0].weight.detach()
    ours, _ = extract_module("lora_unet_0", delta, LayerShape(48, 16, (3, 3)), 4, "fixed", True, torch.float16)
    assert set(ours) == set(reference)
    for key, value in reference.items():  # LyCORIS stores fp16 (alpha as a 1-element vector)
        torch.testing.assert_close(ours[key].half(), value.reshape(ours[key].shape), rtol=4 * FP16_UNIT_ROUNDOFF,
                                   atol=1e-6, msg=key)


def test_extract_refuses_what_it_cannot_do_in_one_line(models, tmp_path):
    base, tuned, _ = models
    with pytest.raises(ToolError, match="mode 'full' is not one of fixed"):
        extract_adapter(base, tuned, tmp_path / "a.safetensors", mode="full")
    with pytest.raises(ToolError, match="linear_ratio must be between 0 and 1"):
        extract_adapter(base, tuned, tmp_path / "a.safetensors", mode="ratio", linear_ratio=2.0)
    with pytest.raises(ToolError, match="every layer equals"):
        extract_adapter(base, base, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
