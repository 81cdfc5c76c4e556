"""Our adapters against the reference ``lycoris-lora`` package (a test-only dependency): same keys, shapes,
initialisation and ΔW, files that load both ways, and gradients equal to the plain formula."""

import logging

import pytest
import torch
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

from lycolab.networks.algorithms.loha import FactoredHadamardFunction, LoHaModule
from lycolab.networks.algorithms.lokr import LoKrModule
from lycolab.networks.algorithms.lora import LoRAModule
from lycolab.networks.merged_weight import merged_weight_forward

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

REFERENCE = {LoRAModule: LoConModule, LoHaModule: LohaModule, LoKrModule: LokrModule}
# (our class, layer factory, dim, alpha, options)
CASES = {
    "lora-linear": (LoRAModule, lambda: nn.Linear(64, 96), 4, 2.0, {}),
    "locon-conv3x3": (LoRAModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 1.0, {}),
    "locon-conv1x1": (LoRAModule, lambda: nn.Conv2d(32, 48, 1), 4, 8.0, {}),
    "locon-tucker": (LoRAModule, lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1), 4, 2.0, {"use_tucker": True}),
    "loha-linear": (LoHaModule, lambda: nn.Linear(64, 96), 4, 2.0, {}),
    "loha-conv3x3": (LoHaModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 1.0, {}),
    "loha-tucker": (LoHaModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 3, 1.5, {"use_tucker": True}),
    "lokr-linear": (LoKrModule, lambda: nn.Linear(64, 96), 2, 1.0, {}),
    "lokr-full-matrices": (LoKrModule, lambda: nn.Linear(64, 96), 16, 4.0, {}),
    "lokr-decompose-both": (LoKrModule, lambda: nn.Linear(320, 640), 2, 1.0, {"decompose_both": True, "factor": 16}),
    "lokr-factor": (LoKrModule, lambda: nn.Linear(64, 96), 2, 1.0, {"factor": 4}),
    "lokr-conv3x3": (LoKrModule, lambda: nn.Conv2d(64, 128, 3, padding=1), 2, 1.0, {}),
    "lokr-tucker": (LoKrModule, lambda: nn.Conv2d(64, 128, 3, padding=1), 2, 1.0, {"use_tucker": True}),
    "lokr-unbalanced": (LoKrModule, lambda: nn.Linear(64, 96), 2, 1.0, {"unbalanced_factorization": True}),
}


def test_lokr_factorization_matches_lycoris():
    from lycoris.functional.general import factorization as reference_factorization

    from lycolab.networks.algorithms.lokr import factorization

    for dimension in range(1, 1400):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 32):
            assert factorization(dimension, factor) == reference_factorization(dimension, factor), (dimension, factor)


def _pair(case, seed=0):
    """(ours, reference) built from the same seed around two identical copies of one layer."""
    our_class, make_layer, dim, alpha, options = CASES[case]
    torch.manual_seed(seed)
    layer = make_layer()
    reference_layer = make_layer()
    reference_layer.load_state_dict(layer.state_dict())
    torch.manual_seed(seed + 1)
    ours = our_class("m", layer, dim, alpha, **options)
    torch.manual_seed(seed + 1)
    reference = REFERENCE[our_class]("m", reference_layer, 1.0, dim, alpha, **options)
    return ours, reference


def _reference_delta(module) -> torch.Tensor:
    """ΔW as the reference's forward applies it (its merge path scales LoHa by alpha/dim twice)."""
    if isinstance(module, LoConModule):
        return module.make_weight() * module.scale
    return module.get_weight(module.shape) * module.scalar


def _randomize(module, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _input_for(layer):
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 8)
    return torch.randn(2, 5, layer.in_features)


@pytest.mark.parametrize("case", CASES)
def test_keys_shapes_and_initialisation_match_reference(case):
    ours, reference = _pair(case)
    our_state, reference_state = ours.state_dict(), reference.state_dict()
    assert sorted(our_state) == sorted(reference_state)
    for key, value in our_state.items():
        assert value.shape == reference_state[key].shape, key
        torch.testing.assert_close(value, reference_state[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("case", CASES)
def test_delta_weight_and_forward_match_reference(case):
    ours, reference = _pair(case)
    _randomize(ours)
    reference.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours.delta_weight(), _reference_delta(reference), rtol=1e-5, atol=1e-6)
        x = _input_for(ours.org_module)
        ours.apply_to()
        reference.apply_to()
        for multiplier in (1.0, 0.6):
            ours.multiplier = reference.multiplier = multiplier
            torch.testing.assert_close(ours.org_module(x), reference.org_module[0](x), rtol=1e-5, atol=1e-5)


# Small layers: gradcheck perturbs every element of every factor.
GRADCHECK_CASES = {
    "loha-linear": (LoHaModule, nn.Linear(8, 12), 2, {}),
    "loha-conv3x3": (LoHaModule, nn.Conv2d(4, 6, 3, padding=1), 2, {}),
    "loha-tucker": (LoHaModule, nn.Conv2d(4, 6, 3, stride=2), 2, {"use_tucker": True}),
    "lokr-linear": (LoKrModule, nn.Linear(8, 12), 1, {}),
    "lokr-decompose-both": (LoKrModule, nn.Linear(8, 12), 1, {"decompose_both": True}),
    "lokr-conv3x3": (LoKrModule, nn.Conv2d(8, 12, 3, padding=1), 1, {}),
    "lokr-tucker": (LoKrModule, nn.Conv2d(8, 12, 3, padding=1), 1, {"use_tucker": True}),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_merged_weight_gradients_pass_gradcheck(case):
    our_class, layer, dim, options = GRADCHECK_CASES[case]
    layer = layer.double().requires_grad_(False)
    ours = our_class("m", layer, dim, 1.5, **options).double()
    _randomize(ours)
    factors = [factor.detach().clone().requires_grad_() for factor in ours.factors()]
    x = (torch.randn(1, layer.in_channels, 5, 5) if ours.is_conv else torch.randn(1, 3, layer.in_features)).double()
    x.requires_grad_()
    row_scale = 0.7 * (torch.arange(layer.weight.shape[0]) % 3 != 0).double()  # multiplier × rank-dropout mask

    def run(x, *factors):
        return merged_weight_forward(x, layer, ours, list(factors), row_scale)

    assert torch.autograd.gradcheck(run, (x, *factors), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layer", [nn.Linear(8, 12), nn.Conv2d(4, 6, 3, stride=2, padding=1)], ids=["linear", "conv"])
def test_factored_loha_gradients_pass_gradcheck(layer):
    layer = layer.double().requires_grad_(False)
    ours = LoHaModule("m", layer, 2, 1.5).double()
    _randomize(ours)
    factors = [factor.detach().clone().requires_grad_() for factor in ours.factors()]
    shape = (1, 4, 5, 5) if ours.is_conv else (1, 3, 8)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    row_factor = 0.7 * (torch.arange(layer.weight.shape[0]) % 3 != 0).double()

    def run(x, *factors):
        return FactoredHadamardFunction.apply(x, layer, row_factor, *factors)

    assert torch.autograd.gradcheck(run, (x, *factors), eps=1e-6, atol=1e-6, rtol=1e-5)


LOHA_PATHS = {"merged": False, "factored": True}


@pytest.mark.parametrize(("case", "loha_path"), [
    ("loha-linear", "merged"), ("loha-linear", "factored"), ("loha-conv3x3", "merged"),
    ("loha-conv3x3", "factored"), ("loha-tucker", "merged"), ("lokr-linear", None), ("lokr-conv3x3", None),
    ("lokr-tucker", None), ("lokr-decompose-both", None),
])
def test_fast_paths_give_the_plain_formulas_outputs_and_gradients(case, loha_path, monkeypatch):
    if loha_path is not None:
        monkeypatch.setattr(LoHaModule, "_factored_is_cheaper", lambda self, x: LOHA_PATHS[loha_path])
    ours, _ = _pair(case)
    _randomize(ours)
    ours.multiplier = 0.8
    x = _input_for(ours.org_module).requires_grad_()
    ours.apply_to()
    fast_output = ours.org_module(x)
    fast_output.square().sum().backward()
    fast = [x.grad] + [factor.grad for factor in ours.factors()]
    x.grad = None
    for factor in ours.factors():
        factor.grad = None
    plain_output = ours.frozen_forward(x, ours.org_module.weight + 0.8 * ours.delta_weight())
    plain_output.square().sum().backward()
    plain = [x.grad] + [factor.grad for factor in ours.factors()]
    torch.testing.assert_close(fast_output, plain_output, rtol=1e-5, atol=1e-5)
    for got, expected in zip(fast, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
