"""Diag-OFT and BOFT against the reference ``lycoris-lora`` 4.1.3 modules, and the properties their fast path relies
on: the same keys, shapes, initialisation, rotated weight and forward (multiplier and rank dropout included),
gradients of the output-side rotation equal to plain autograd through W' = D · T · W, orthogonal rotations, training
that moves only the adapter, and merging that reproduces the forward."""

import logging

import pytest
import torch
from conftest import randomize_parameters
from lycoris.functional.general import power2factorization
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule as ReferenceDiagOFT
from torch import nn

from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import create_network
from lycolab.networks.algorithms.boft import BOFTModule, butterfly_factorization
from lycolab.networks.algorithms.diag_oft import DiagOFTModule
from lycolab.networks.merge import merge_network
from lycolab.networks.oft_math import OrthogonalAdapter, cayley, transform_channels, transform_channels_plain
from lycolab.networks.registry import algorithm_of_module

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

REFERENCE = {DiagOFTModule: ReferenceDiagOFT, BOFTModule: ButterflyOFTModule}
# (our class, layer factory, dim, options)
CASES = {
    "diag-linear": (DiagOFTModule, lambda: nn.Linear(24, 64), 8, {}),
    "diag-linear-uneven": (DiagOFTModule, lambda: nn.Linear(24, 96), 32, {}),  # 96 = 8 blocks of 12
    "diag-conv": (DiagOFTModule, lambda: nn.Conv2d(8, 32, 3, padding=1), 4, {}),
    "diag-constraint-rescaled": (DiagOFTModule, lambda: nn.Conv2d(8, 32, 3, padding=1), 4,
                                 {"constraint": 1e-3, "rescaled": True}),
    "diag-grouped-conv": (DiagOFTModule, lambda: nn.Conv2d(8, 32, 3, padding=1, groups=2), 4, {"rescaled": True}),
    "boft-linear": (BOFTModule, lambda: nn.Linear(24, 64), 4, {}),
    "boft-linear-wide-blocks": (BOFTModule, lambda: nn.Linear(24, 96), 16, {}),  # 96 = 8 blocks of 12
    "boft-conv": (BOFTModule, lambda: nn.Conv2d(8, 32, 3, stride=2, padding=1), 8, {}),
    "boft-constraint-rescaled": (BOFTModule, lambda: nn.Linear(24, 64), 8, {"constraint": 1e-3, "rescaled": True}),
    "boft-grouped-conv": (BOFTModule, lambda: nn.Conv2d(8, 32, 3, padding=1, groups=4), 4, {}),
}


def _pair(case, seed=0):
    """(ours, reference) around two identical copies of one layer, built under the same seed."""
    our_class, make_layer, dim, options = CASES[case]
    torch.manual_seed(seed)
    layer = make_layer()
    reference_layer = make_layer()
    reference_layer.load_state_dict(layer.state_dict())
    options = {"constraint": 0.0, **options}  # LyCORIS' default is the int 0, which would make alpha an int tensor
    torch.manual_seed(seed + 1)
    ours = our_class("m", layer, dim, 2.0, **options)
    torch.manual_seed(seed + 1)
    reference = REFERENCE[our_class]("m", reference_layer, 1.0, dim, 2.0, **options)
    return ours, reference


def _randomize(module, seed=3, std=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * std)


def _input_for(layer, dtype=torch.float32):
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 6, 6, dtype=dtype)
    return torch.randn(2, 5, layer.in_features, dtype=dtype)


def test_butterfly_factorization_matches_lycoris():
    for dimension in range(1, 1300):
        for factor in (-1, 2, 4, 8, 10, 12, 16, 32):
            block, count = power2factorization(dimension, factor)
            expected = None if count == 0 else (block, count)
            assert butterfly_factorization(dimension, factor) == expected, (dimension, factor)


def test_boft_refuses_a_width_it_cannot_split_and_says_which_dim_would():
    with pytest.raises(ValueError, match=r"lora_unet_x: BOFT cannot split 320 .* at least 10"):
        BOFTModule("lora_unet_x", nn.Linear(8, 320), 8, 1.0)


@pytest.mark.parametrize("case", CASES)
def test_keys_shapes_and_initialisation_match_reference(case):
    ours, reference = _pair(case)
    our_state, reference_state = ours.state_dict(), reference.state_dict()
    assert sorted(our_state) == sorted(reference_state)
    for key, value in our_state.items():
        torch.testing.assert_close(value, reference_state[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("case", CASES)
def test_rotated_weight_and_forward_match_reference(case):
    ours, reference = _pair(case)
    _randomize(ours)
    reference.load_state_dict(ours.state_dict())
    x = _input_for(ours.org_module)
    ours.apply_to()
    reference.apply_to()
    with torch.no_grad():
        for multiplier in (1.0, 0.6):
            ours.multiplier = reference.multiplier = multiplier
            expected_weight = reference.get_merged_weight(multiplier)[0]
            torch.testing.assert_close(ours.rotated_weight(multiplier), expected_weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours.org_module(x), reference.org_module[0](x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["diag-linear", "diag-constraint-rescaled"])
def test_rank_dropout_drops_the_same_rotation_entries_as_lycoris(case):
    our_class, make_layer, dim, options = CASES[case]
    layer = make_layer()
    ours = our_class("m", layer, dim, 1.0, rank_dropout=0.3, **{"constraint": 0.0, **options})
    reference = ReferenceDiagOFT("m", layer, 0.7, dim, 1.0, rank_dropout=0.3, **{"constraint": 0.0, **options})
    _randomize(ours)
    reference.load_state_dict(ours.state_dict())
    ours.multiplier = 0.7
    x = _input_for(layer)
    with torch.no_grad():
        torch.manual_seed(11)
        got = ours.train()(x)
        torch.manual_seed(11)
        expected = reference.train()(x)
        assert not torch.allclose(got, ours.eval()(x))  # something was dropped
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


PATHS = {"output-side": True, "merged-weight": False}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_fast_paths_give_the_plain_formulas_outputs_and_gradients(case, path, monkeypatch):
    """float64, so any difference is the custom backward's, not rounding."""
    monkeypatch.setattr(OrthogonalAdapter, "_rotates_output", lambda self, x, stages: PATHS[path])
    ours, _ = _pair(case)
    ours.org_module.double()
    ours.double()
    _randomize(ours)
    ours.multiplier = 0.8
    x = _input_for(ours.org_module, torch.float64).requires_grad_()
    ours.apply_to()
    parameters = list(ours.parameters())

    def gradients(output):
        return torch.autograd.grad(output.square().sum(), [x, *parameters])

    fast_output = ours.org_module(x)
    plain_output = ours.frozen_forward(x, ours.rotated_weight(0.8))
    torch.testing.assert_close(fast_output, plain_output, rtol=1e-12, atol=1e-12)
    for got, expected in zip(gradients(fast_output), gradients(plain_output), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# channels last with one stage (a Linear's (T, C)), with a butterfly ((1, C, T)), and a conv's (N, C, H·W)
LAYOUTS = {"linear-one-stage": (-1, (3, 16), [0]), "linear-butterfly": (-1, (3, 16), [2, 4, 8]),
           "conv-butterfly": (1, (2, 16, 3), [2, 4, 8])}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_transform_backward_passes_gradcheck(layout):
    channel_dim, shape, half_strides = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(0)

    def random(*size):
        return torch.randn(size, generator=generator, dtype=torch.float64).requires_grad_()

    values, rescale, bias = random(*shape), random(16, 1), random(16)
    stages = [random(4, 4, 4) for _ in half_strides]

    def run(values, rescale, bias, *stages):
        return transform_channels(values, stages, half_strides, rescale, channel_dim, bias)

    assert torch.autograd.gradcheck(run, (values, rescale, bias, *stages), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("case", ["diag-linear", "diag-linear-uneven", "boft-conv", "boft-linear-wide-blocks"])
def test_rotation_is_orthogonal_without_a_constraint(case):
    ours, _ = _pair(case)
    ours.double()
    _randomize(ours, std=1.0)
    with torch.no_grad():
        channels = ours.weight_shape[0]
        rotation = transform_channels_plain(torch.eye(channels, dtype=torch.float64), ours.stages(1.0, False),
                                            ours.half_strides, None, 0)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(channels, dtype=torch.float64), rtol=0, atol=1e-12)


def test_constraint_caps_the_skew_norm_at_constraint_times_width():
    blocks = torch.randn(5, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    limit = 0.01 * 20
    capped = cayley(blocks, limit)
    eye = torch.eye(4, dtype=torch.float64)
    skew = torch.linalg.solve(capped + eye, capped - eye)  # the Cayley transform inverted: Q = (R + I)⁻¹(R − I)
    norm = torch.linalg.vector_norm(blocks - blocks.transpose(-1, -2))
    expected = limit * norm / (norm + 1e-8)  # LyCORIS divides by ‖Q‖ + 1e-8
    assert torch.linalg.vector_norm(skew) == pytest.approx(float(expected), rel=1e-12)
    torch.testing.assert_close(cayley(blocks * 1e-4, limit), cayley(blocks * 1e-4, 0.0), rtol=0, atol=0)


def test_files_tell_the_two_apart_by_the_blocks_rank():
    assert algorithm_of_module({"oft_blocks": torch.zeros(8, 4, 4), "alpha": torch.tensor(0.0)}).name == "diag-oft"
    assert algorithm_of_module({"oft_blocks": torch.zeros(3, 4, 4, 4), "alpha": torch.tensor(0.0)}).name == "boft"


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_a_training_step_moves_the_adapter_and_leaves_the_base_weights(algo):
    sd = build_tiny_sd(pretrained=False)
    base = {key: value.clone() for key, value in sd.unet.state_dict().items()}
    network = create_network(sd.unet, algo=algo, dim=4, alpha=1.0, conv_dim=2, network_module="lycoris.kohya",
                             rescaled=True)
    before = {key: value.clone() for key, value in network.state_dict().items()}
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, sd.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    sd.unet(sample, torch.tensor([500]), context).sample.square().mean().backward()
    optimizer.step()
    after = network.state_dict()
    moved = [key for key in before if not torch.equal(before[key], after[key])]
    assert {key.rpartition(".")[2] for key in moved} == {"oft_blocks", "rescale"}
    assert len({key.rpartition(".")[0] for key in moved}) == len(network.adapters)
    for key, value in sd.unet.state_dict().items():
        assert torch.equal(value, base[key]), key


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_merging_gives_the_adapted_models_outputs(algo):
    sd = build_tiny_sd(pretrained=False)
    network = create_network(sd.unet, [sd.text_encoder], algo=algo, dim=4, conv_dim=2, network_module="lycoris.kohya",
                             rescaled=True, constraint=0.01)
    randomize_parameters(network.parameters())
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, sd.tokenizer.vocab_size, (1, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = sd.unet(sample, torch.tensor([500]), sd.text_encoder(ids)[0]).sample
        merge_network(network)
        merged = sd.unet(sample, torch.tensor([500]), sd.text_encoder(ids)[0]).sample
    assert (merged - adapted).norm() <= 1e-5 * adapted.norm()


@pytest.mark.parametrize("case", ["diag-constraint-rescaled", "boft-constraint-rescaled"])
def test_delta_at_a_multiplier_is_what_the_forward_adds_there(case):
    """W'(m) − W, not m · ΔW: each block moves linearly but BOFT multiplies stages and D scales them."""
    ours, _ = _pair(case)
    _randomize(ours)
    ours.multiplier = 0.5
    x = _input_for(ours.org_module)
    ours.apply_to()
    with torch.no_grad():
        merged = ours.frozen_forward(x, ours.org_module.weight + ours.weight_change(0.5))
        torch.testing.assert_close(ours.org_module(x), merged, rtol=1e-5, atol=1e-5)
        linear = ours.frozen_forward(x, ours.org_module.weight + 0.5 * ours.delta_weight())
        assert not torch.allclose(ours.org_module(x), linear, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", ["diag-linear", "boft-conv"])
def test_max_norm_scales_the_blocks_as_lycoris(case):
    ours, reference = _pair(case)
    _randomize(ours)
    reference.load_state_dict(ours.state_dict())
    limit = 0.5 * ours.norm_for_max_norm().item()
    scaled, reported = reference.apply_max_norm(limit)
    with torch.no_grad():
        norm = ours.norm_for_max_norm()
        clamped = norm.clamp(min=limit / 2)
        ours.scale_delta(clamped.clamp(max=limit) / clamped)
    assert scaled
    torch.testing.assert_close(ours.oft_blocks, reference.oft_blocks, rtol=0, atol=0)
    torch.testing.assert_close(ours.norm_for_max_norm(), reported, rtol=1e-6, atol=0)
