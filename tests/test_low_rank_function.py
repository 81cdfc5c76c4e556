"""LoRA/LoCon's one-op layer (lycolab.networks.low_rank_function) against the plain modules it replaces.

In float64 the two compute the same sums in another order, so outputs and gradients agree to a few ulp of their
magnitude; the fast path must also be the one actually taken, and must step aside where it would not be exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lycolab.networks.algorithms.lora import LoRAModule

FLOAT64_TOLERANCE = 64 * torch.finfo(torch.float64).eps  # relative to the largest magnitude, sums of ≤ 300 terms

LAYERS = {
    "linear-3d": (lambda: nn.Linear(10, 12), (2, 5, 10)),
    "linear-2d-no-bias": (lambda: nn.Linear(10, 12, bias=False), (3, 10)),
    "linear-1d": (lambda: nn.Linear(10, 12), (10,)),
    "conv3x3": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 5)),
    "conv3x3-stride2": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 7, 5)),
    "conv3x3-dilated-no-bias": (lambda: nn.Conv2d(6, 8, 3, padding=2, dilation=2, bias=False), (1, 6, 9, 9)),
    "conv1x1": (lambda: nn.Conv2d(6, 8, 1), (2, 6, 7, 5)),
    "conv1x1-stride2": (lambda: nn.Conv2d(6, 8, 1, stride=2), (2, 6, 7, 5)),
}


def _adapter(layer: nn.Module, rank: int = 3, multiplier: float = 0.7) -> LoRAModule:
    torch.manual_seed(0)
    layer = layer.double().requires_grad_(False)
    module = LoRAModule("lora_test", layer, rank, 2.0, multiplier).double()
    nn.init.normal_(module.lora_up.weight)  # up starts at zero: make ΔW and every gradient non-trivial
    module.apply_to()
    return module


def _run(function, x: torch.Tensor, module: LoRAModule, grad: torch.Tensor | None = None):
    """(output, ∂x, ∂down, ∂up) of ``function(x)`` for a fixed output gradient."""
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = function(x)
    grad = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1)) if grad is None else grad
    (y * grad).sum().backward()
    return y.detach(), x.grad, module.lora_down.weight.grad, module.lora_up.weight.grad


def _assert_close(ours, reference):
    for got, want in zip(ours, reference, strict=True):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= FLOAT64_TOLERANCE * want.abs().max()


@pytest.mark.parametrize("name", list(LAYERS))
def test_fused_layer_equals_the_plain_modules_in_output_and_every_gradient(name):
    make_layer, shape = LAYERS[name]
    module = _adapter(make_layer())
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fused = _run(module.org_module, x, module)
    plain = _run(module._modules_forward, x, module)
    _assert_close(fused, plain)


@pytest.mark.parametrize("name", ["linear-3d", "conv3x3-stride2", "conv1x1"])
def test_fused_layer_passes_gradcheck(name):
    make_layer, shape = LAYERS[name]
    module = _adapter(make_layer(), rank=2)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    down, up = module.lora_down.weight, module.lora_up.weight
    from lycolab.networks.low_rank_function import low_rank_forward

    def function(x, down, up):
        return low_rank_forward(x, module.org_module, down, up, 0.35, torch.float64)

    assert torch.autograd.gradcheck(function, (x, down, up))


def test_fused_path_is_taken_and_saves_the_callers_input_not_a_copy():
    module = _adapter(nn.Linear(10, 12))
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    y = module.org_module(x)
    assert type(y.grad_fn).__name__ == "_LowRankLinearBackward"
    assert y.grad_fn.saved_tensors[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("name", ["conv3x3", "conv1x1"])
def test_channels_last_and_non_contiguous_inputs_give_the_same_result(name):
    make_layer, shape = LAYERS[name]
    module = _adapter(make_layer())
    x = torch.randn(shape, dtype=torch.float64)
    reference = _run(module._modules_forward, x, module)
    channels_last = _run(module.org_module, x.contiguous(memory_format=torch.channels_last), module)
    _assert_close(channels_last, reference)
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    _assert_close(_run(module.org_module, transposed, module), reference)


def test_linear_on_a_transposed_input_equals_the_plain_modules():
    module = _adapter(nn.Linear(10, 12))
    x = torch.randn(10, 6, dtype=torch.float64).t()  # (6, 10), not contiguous
    _assert_close(_run(module.org_module, x, module), _run(module._modules_forward, x, module))


@pytest.mark.parametrize("case", ["dropout", "rank_dropout", "use_tucker", "use_scalar", "unfrozen", "stacked"])
def test_plain_modules_run_where_the_fused_path_would_not_be_exact(case):
    layer = nn.Conv2d(6, 8, 3, padding=1) if case == "use_tucker" else nn.Linear(10, 12)
    layer = layer.double().requires_grad_(False)
    options = {case: 0.5} if "dropout" in case else {case: True} if case.startswith("use") else {}
    if case == "stacked":  # a second network on the same layer: its calls must go through the first
        LoRAModule("lora_first", layer, 2, 1.0).double().apply_to()
    module = LoRAModule("lora_test", layer, 3, 2.0, **options).double()
    module.apply_to()
    if case == "unfrozen":
        layer.weight.requires_grad_(True)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64) if case == "use_tucker" else torch.randn(3, 10).double()
    assert not module._runs_fused()
    assert "LowRank" not in type(layer(x).grad_fn).__name__


@pytest.mark.parametrize("layer", [nn.Conv2d(6, 8, 3, padding="same"),
                                   nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect")],
                         ids=["padding-same", "reflect-padding"])
def test_convs_the_fused_op_cannot_express_run_the_plain_modules_and_stay_equal_to_the_formula(layer):
    layer = layer.double().requires_grad_(False)
    module = LoRAModule("lora_test", layer, 3, 2.0).double()
    nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    assert not module._runs_fused()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        want = module.original_forward(x) + module.lora_up(module.lora_down(x)) * module.scale
        assert torch.equal(layer(x), want)


def test_fused_path_runs_in_eval_mode_with_dropout_configured():
    module = _adapter(nn.Linear(10, 12))
    module.dropout = module.rank_dropout = 0.5
    module.eval()
    assert module._runs_fused()
    module.train()
    assert not module._runs_fused()


def test_under_bfloat16_autocast_the_fused_layer_matches_the_plain_modules_to_bfloat16_rounding():
    torch.manual_seed(0)
    layer = nn.Linear(32, 24).requires_grad_(False)
    module = LoRAModule("lora_test", layer, 4, 2.0)
    nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x)
        plain = module._modules_forward(x)
    assert fused.dtype == plain.dtype == torch.bfloat16
    # each is a bf16 rounding of sums of 32 bf16 products (8 significant bits): a few units in the last place apart
    tolerance = 8 * 2.0**-8 * plain.float().abs().max()
    assert (fused.float() - plain.float()).abs().max() <= tolerance
