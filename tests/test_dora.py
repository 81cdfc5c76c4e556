"""DoRA (``dora_wd``), ``use_scalar`` and ``rs_lora`` for LoRA/LoCon, LoHa and LoKr against lycoris-lora 4.1.3: the
same initialisation, ΔW, decomposed weight and forward, files both ways, max-norm, merging, and a fast autograd path
whose gradients equal plain autograd through the formula."""

import logging
import math

import pytest
import torch
from conftest import randomize_parameters
from lycoris.modules import make_module
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from lycoris_interop import (
    RELATIVE_TOLERANCE,
    AlgorithmCase,
    assert_outputs_changed,
    assert_same_outputs,
    model_outputs,
    our_network,
    reference_from_file,
    reference_network,
)
from torch import nn

from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import AdapterFileError, create_network, load_network
from lycolab.networks.algorithms.loha import LoHaModule
from lycolab.networks.algorithms.lokr import LoKrModule
from lycolab.networks.algorithms.lora import LoRAModule
from lycolab.networks.dora import DecomposedWeightFunction, decompose
from lycolab.networks.merge import merge_network

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

REFERENCE = {LoRAModule: LoConModule, LoHaModule: LohaModule, LoKrModule: LokrModule}
REFERENCE_NAMES = {"dora_wd": "weight_decompose", "wd_on_output": "wd_on_out"}
DORA, DORA_IN = {"dora_wd": True}, {"dora_wd": True, "wd_on_output": False}
# (our class, layer factory, dim, alpha, options)
CASES = {
    "lora-dora": (LoRAModule, lambda: nn.Linear(64, 96), 4, 2.0, DORA),
    "lora-dora-input-axis": (LoRAModule, lambda: nn.Linear(64, 96), 4, 2.0, DORA_IN),
    "locon-dora": (LoRAModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 1.0, DORA),
    "locon-dora-input-axis": (LoRAModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 1.0, DORA_IN),
    "locon-tucker-dora": (LoRAModule, lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1), 4, 2.0,
                          {**DORA, "use_tucker": True}),
    "locon-scalar": (LoRAModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 1.0, {"use_scalar": True}),
    "locon-tucker-scalar": (LoRAModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 1.0,
                            {"use_scalar": True, "use_tucker": True}),
    "lora-dora-scalar": (LoRAModule, lambda: nn.Linear(64, 96), 4, 2.0, {**DORA, "use_scalar": True}),
    "lora-rs-lora": (LoRAModule, lambda: nn.Linear(64, 96), 8, 4.0, {"rs_lora": True}),
    "loha-dora": (LoHaModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 1.0, DORA),
    "loha-dora-input-axis": (LoHaModule, lambda: nn.Linear(64, 96), 4, 2.0, DORA_IN),
    "loha-tucker-dora": (LoHaModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 3, 1.5, {**DORA, "use_tucker": True}),
    "loha-scalar": (LoHaModule, lambda: nn.Linear(64, 96), 4, 2.0, {"use_scalar": True}),
    "loha-dora-scalar": (LoHaModule, lambda: nn.Linear(64, 96), 4, 2.0, {**DORA, "use_scalar": True}),
    "loha-rs-lora": (LoHaModule, lambda: nn.Linear(64, 96), 4, 2.0, {"rs_lora": True}),
    "lokr-dora": (LoKrModule, lambda: nn.Linear(64, 96), 2, 1.0, DORA),
    "lokr-conv-dora-input-axis": (LoKrModule, lambda: nn.Conv2d(64, 128, 3, padding=1), 2, 1.0, DORA_IN),
    "lokr-tucker-dora": (LoKrModule, lambda: nn.Conv2d(64, 128, 3, padding=1), 2, 1.0, {**DORA, "use_tucker": True}),
    "lokr-scalar": (LoKrModule, lambda: nn.Linear(64, 96), 2, 1.0, {"use_scalar": True}),
    "lokr-full-scalar": (LoKrModule, lambda: nn.Linear(64, 96), 16, 4.0, {"use_scalar": True}),
    "lokr-decompose-both-scalar": (LoKrModule, lambda: nn.Linear(320, 640), 2, 1.0,
                                   {"use_scalar": True, "decompose_both": True, "factor": 16}),
    "lokr-rs-lora": (LoKrModule, lambda: nn.Linear(64, 96), 4, 2.0, {"rs_lora": True}),
}
DORA_CASES = [case for case in CASES if CASES[case][4].get("dora_wd")]


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
    reference_options = {REFERENCE_NAMES.get(key, key): value for key, value in options.items()}
    reference = REFERENCE[our_class]("m", reference_layer, 1.0, dim, alpha, **reference_options)
    return ours, reference


def _randomize(module, seed=3):
    """Random factors, a dora_scale near the weight's norms (a random one would only amplify rounding) and a scalar
    away from 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if name == "dora_scale":
                parameter.mul_(1 + 0.1 * noise)
            elif name == "scalar":
                parameter.fill_(0.7)
            else:
                parameter.copy_(noise * 0.2)


def _input_for(layer, dtype=torch.float32):
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 8, dtype=dtype)
    return torch.randn(2, 5, layer.in_features, dtype=dtype)


def _reference_delta(module) -> torch.Tensor:
    """ΔW before the decomposition, as the reference's forward makes it."""
    if isinstance(module, LoConModule):
        return module.make_weight() * module.scale
    return module.get_weight(module.shape) * module.scalar


@pytest.mark.parametrize("case", CASES)
def test_keys_shapes_and_initialisation_equal_lycoris_under_the_same_seed(case):
    ours, reference = _pair(case)
    our_state, reference_state = ours.state_dict(), reference.state_dict()
    assert sorted(our_state) == sorted(reference_state)  # no "scalar": both fold it into a factor
    for key, value in our_state.items():
        torch.testing.assert_close(value, reference_state[key], rtol=0, atol=0, msg=key)
    if ours.use_scalar:
        assert ours.scalar.item() == 0.0
        assert ours.factor_delta(*ours.own_factors()).abs().sum() > 0  # the factor that was zero starts random


@pytest.mark.parametrize("case", CASES)
def test_delta_decomposed_weight_and_forward_equal_lycoris(case):
    ours, reference = _pair(case)
    _randomize(ours)
    reference.load_state_dict(ours.state_dict())  # the scalar arrives folded into its factor, as in a file
    weight = reference.org_weight
    with torch.no_grad():
        torch.testing.assert_close(ours.make_delta(*ours.factors()), _reference_delta(reference).view(weight.shape),
                                   rtol=1e-5, atol=1e-6)
        x = _input_for(ours.org_module)
        ours.apply_to()
        reference.apply_to()
        for multiplier in (1.0, 0.6):
            ours.multiplier = reference.multiplier = multiplier
            torch.testing.assert_close(ours.org_module(x), reference.org_module[0](x), rtol=1e-5, atol=1e-5)
            if ours.dora:  # as the reference's forward makes it (its merge path scales LoHa/LoKr twice)
                merged = weight + _reference_delta(reference).view(weight.shape)
                expected = reference.apply_weight_decompose(merged, multiplier) - weight
                torch.testing.assert_close(ours.weight_change(multiplier), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", DORA_CASES)
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
def test_fast_decomposed_path_has_the_plain_formulas_output_and_gradients(case, multiplier):
    """float64, so the only differences are the two orders of summation."""
    ours, _ = _pair(case)
    ours.double()
    ours.org_module.double()
    _randomize(ours)
    layer = ours.org_module
    row_mask = (torch.arange(layer.weight.shape[0]) % 3 != 0).double() * 1.5  # a rank-dropout mask, rescaled
    leaves = [ours.dora_scale, *ours.factors()]
    x = _input_for(layer, torch.float64).requires_grad_()

    fast = DecomposedWeightFunction.apply(x, layer, ours, row_mask, multiplier, ours.dora_on_output, *leaves)
    fast_grads = torch.autograd.grad(fast.square().sum(), [x, *leaves])

    delta = ours.make_delta(*ours.factors()) * row_mask.view(-1, *[1] * (layer.weight.dim() - 1))
    plain = ours.frozen_forward(x, decompose(layer.weight + delta, ours.dora_scale, multiplier, ours.dora_on_output))
    plain_grads = torch.autograd.grad(plain.square().sum(), [x, *leaves])
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-12)
    for got, expected in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", ["lora-dora-scalar", "loha-dora"])
def test_fast_decomposed_path_passes_gradcheck(case):
    our_class, _, dim, alpha, options = CASES[case]
    layer = nn.Linear(6, 8).double().requires_grad_(False)
    ours = our_class("m", layer, 2, alpha, **options).double()
    _randomize(ours)
    x = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    row_mask = (torch.arange(layer.weight.shape[0]) % 3 != 0).double()

    def run(x, *leaves):
        return DecomposedWeightFunction.apply(x, layer, ours, row_mask, 0.8, ours.dora_on_output, *leaves)

    leaves = [leaf.detach().clone().requires_grad_() for leaf in [ours.dora_scale, *ours.factors()]]
    assert torch.autograd.gradcheck(run, (x, *leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_a_dora_network_trains_a_step():
    sd = build_tiny_sd()
    network = create_network(sd.unet, algo="locon", dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0,
                             network_module="lycoris.kohya", dora_wd=True, use_scalar=True)
    network.train()
    before = {name: value.detach().clone() for name, value in network.named_parameters()}
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        context = sd.text_encoder(torch.randint(0, sd.tokenizer.vocab_size, (1, 77), generator=generator))[0]
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    loss = sd.unet(sample, torch.tensor([500]), context).sample.square().mean()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = {name.rpartition(".")[2] if name.endswith(("scale", "scalar")) else name.split(".", 1)[1]
               for name, value in network.named_parameters() if not torch.equal(value, before[name])}
    assert {"dora_scale", "scalar", "lora_down.weight", "lora_up.weight"} <= changed


@pytest.mark.parametrize("case", ["locon-dora", "loha-dora", "lokr-dora"])
@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rank-dropout-scale"])
def test_rank_dropout_drops_the_rows_lycoris_drops_under_the_same_seed(case, rescale):
    """In training, DoRA modules drop whole rows of ΔW before the decomposition (LyCORIS' rebuild path), with one
    draw per row, so under one seed both give the same output."""
    ours, reference = _pair(case)
    _randomize(ours)
    reference.load_state_dict(ours.state_dict())
    ours.rank_dropout = reference.rank_dropout = 0.3
    ours.rank_dropout_scale = reference.rank_dropout_scale = rescale
    ours.train()
    reference.train()
    ours.apply_to()
    reference.apply_to()
    x = _input_for(ours.org_module)
    with torch.no_grad():
        torch.manual_seed(5)
        got = ours.org_module(x)
        torch.manual_seed(5)
        expected = reference.org_module[0](x)
        torch.manual_seed(6)
        assert not torch.allclose(ours.org_module(x), got)  # another draw, other rows
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["locon-dora", "loha-dora", "lokr-dora", "lora-dora-scalar", "loha-scalar",
                                  "lokr-scalar"])
def test_max_norm_scales_like_lycoris_apply_max_norm(case):
    """The ΔW LyCORIS measures (before the decomposition) and where the ratio lands give the same module after."""
    ours, reference = _pair(case)
    _randomize(ours)
    ours.load_state_dict(ours.state_dict())  # as after a resume: the scalar folded in and 1, as LyCORIS loads it
    reference.load_state_dict(ours.state_dict())
    with torch.no_grad():
        norm = ours.max_norm_delta().norm()
        max_norm = float(norm) * 0.8
        clamped = norm.clamp(min=max_norm / 2)
        ratio = torch.clamp(clamped, max=max_norm) / clamped
        ours.scale_delta(ratio)
        scaled, reference_norm = reference.apply_max_norm(max_norm)
    assert scaled
    torch.testing.assert_close(norm * ratio, reference_norm, rtol=1e-5, atol=0)
    x = _input_for(ours.org_module)
    ours.apply_to()
    reference.apply_to()
    with torch.no_grad():
        torch.testing.assert_close(ours.org_module(x), reference.org_module[0](x), rtol=1e-5, atol=1e-5)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], rtol=1e-6, atol=1e-7, msg=key)


def test_merging_a_dora_network_equals_its_forward():
    sd = build_tiny_sd()
    network = our_network(sd, AlgorithmCase(id="locon-dora", algo="locon", options={"dora_wd": True}))
    _randomize_network(network.named_parameters())
    adapted = model_outputs(sd)
    merge_network(network)
    for got, expected in zip(model_outputs(sd), adapted, strict=True):
        assert (got - expected).norm() / expected.norm() <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("case", DORA_CASES)
def test_a_layer_with_delta_weight_added_runs_as_the_dora_adapter(case):
    """What merging adds (``delta_weight()`` = W' − W) reproduces the forward: the decomposition is in it."""
    ours, _ = _pair(case)
    _randomize(ours)
    x = _input_for(ours.org_module)
    ours.apply_to()
    with torch.no_grad():
        expected = ours.org_module(x)
        got = ours.frozen_forward(x, ours.org_module.weight + ours.delta_weight())
        assert not torch.allclose(got, ours.frozen_forward(x, ours.org_module.weight + ours.max_norm_delta()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_decomposed_weight_change_at_another_multiplier_equals_that_forward():
    ours, _ = _pair("locon-dora")
    _randomize(ours)
    x = _input_for(ours.org_module)
    ours.apply_to()
    ours.multiplier = 0.4
    with torch.no_grad():
        expected = ours.org_module(x)
        got = ours.frozen_forward(x, ours.org_module.weight + ours.weight_change(0.4))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_use_scalar_state_dict_holds_the_scalar_folded_and_loads_back_with_scalar_one():
    ours, _ = _pair("loha-scalar")
    _randomize(ours)
    delta = ours.delta_weight().detach()
    state = ours.state_dict()
    assert "scalar" not in state
    torch.testing.assert_close(state["hada_w1_a"], ours.hada_w1_a.detach() * 0.7)
    rebuilt, _ = _pair("loha-scalar", seed=7)
    rebuilt.load_state_dict(state)  # strict: the missing scalar is expected
    assert rebuilt.scalar.item() == 1.0
    torch.testing.assert_close(rebuilt.delta_weight(), delta, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_rs_lora_scales_by_the_root_of_dim_and_saves_an_alpha_plain_loaders_read(algo):
    case = {"lora": "lora-rs-lora", "loha": "loha-rs-lora", "lokr": "lokr-rs-lora"}[algo]
    ours, _ = _pair(case)
    dim, alpha = CASES[case][2], CASES[case][3]
    assert ours.scale == pytest.approx(alpha / math.sqrt(dim))
    assert float(ours.alpha) == pytest.approx(alpha * math.sqrt(dim))
    _randomize(ours)
    weights = {key: value.detach() for key, value in ours.state_dict().items()}
    loaded = type(ours).from_weights("m", ours.org_module, weights)
    torch.testing.assert_close(loaded.delta_weight(), ours.delta_weight().detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", DORA_CASES)
def test_dora_modules_rebuild_from_each_others_tensors(case):
    """LyCORIS' tensors in our ``from_weights`` and ours in its ``make_module_from_state_dict`` (norms per output row
    only: per input column it cannot rebuild, see below), with the same outputs."""
    ours, reference = _pair(case)
    _randomize(ours)
    reference.load_state_dict(ours.state_dict())
    x = _input_for(ours.org_module)
    with torch.no_grad():
        reference.apply_to()
        expected = reference.org_module[0](x)
        reference.restore()
        weights = {key: value.detach() for key, value in reference.state_dict().items()}
        rebuilt = type(ours).from_weights("m", ours.org_module, weights)
        assert rebuilt.dora and rebuilt.dora_on_output == ours.dora_on_output
        rebuilt.apply_to()
        torch.testing.assert_close(ours.org_module(x), expected, rtol=1e-5, atol=1e-5)
        rebuilt.restore()
        # LyCORIS cannot rebuild LoKr's tucker form (it reads the rank from the wrong axis of lokr_w2_a)
        if ours.dora_on_output and not (ours.algo == "lokr" and ours.tucker):
            parameters = [weights.get(key) for key in REFERENCE[type(ours)].weight_list]
            theirs = make_module(REFERENCE[type(ours)], parameters, "m", reference.org_module[0])
            theirs.apply_to()
            torch.testing.assert_close(theirs.org_module[0](x), expected, rtol=1e-5, atol=1e-5)


def _randomize_network(parameters) -> None:
    """Random factors and a dora_scale kept near the norms it starts from (see tests/algorithm_cases/lora.toml: the
    harness' N(0, 0.1) draws would make LyCORIS' own float32 forward lose ~1e-5 to cancellation)."""
    named = list(parameters)
    randomize_parameters([parameter for name, parameter in named if not name.endswith("dora_scale")])
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in named:
            if name.endswith("dora_scale"):
                parameter.mul_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))


# The interop rows for DoRA (as tests/algorithm_cases/*.toml rows would be; the module-level tests above cover
# tucker, use_scalar and both directions for every algorithm): (id, algo, our options, LyCORIS' options, direction)
DORA_ROWS = [
    ("locon-dora", "locon", DORA, {"weight_decompose": True}, "ours-to-lycoris"),
    ("locon-dora", "locon", DORA, {"weight_decompose": True}, "lycoris-to-ours"),
    ("loha-dora", "loha", DORA, {"weight_decompose": True}, "lycoris-to-ours"),
    ("lokr-dora", "lokr", {**DORA, "factor": 4}, {"weight_decompose": True, "factor": 4}, "ours-to-lycoris"),
]


@pytest.mark.parametrize("row", DORA_ROWS, ids=[f"{row[0]}-{row[4]}" for row in DORA_ROWS])
def test_dora_files_load_across_lycoris_and_ours_with_the_same_outputs(row, tmp_path):
    name, algo, options, reference_options, direction = row
    case = AlgorithmCase(id=name, algo=algo, options=options, reference_options=reference_options)
    source_sd, target_sd = build_tiny_sd(), build_tiny_sd()
    path = tmp_path / f"{name}.safetensors"
    if direction == "ours-to-lycoris":
        source = our_network(source_sd, case)
        _randomize_network(source.named_parameters())
        source.save_weights(path, dtype=torch.float32)
        target, _ = reference_from_file(path, target_sd)
        target.apply_to(target_sd.text_encoder, target_sd.unet, True, True)
        assert len(target.loras) == len(source.adapters)
    else:
        source = reference_network(source_sd, case)
        _randomize_network(source.named_parameters())
        source.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
        target = load_network(path, target_sd.unet, [target_sd.text_encoder])
        assert len(target.adapters) == len(source.loras) and all(adapter.dora for adapter in target.adapters)
    assert_outputs_changed(source_sd, build_tiny_sd())
    assert_same_outputs(target_sd, source_sd)


def test_norms_per_input_column_load_from_lycoris_files(tmp_path):
    """``wd_on_output = false``: LyCORIS 4.1.3 writes such files but cannot read them (its loader always builds the
    norms per output row, and copying a (1, in) dora_scale into (out, 1) fails), so this direction is tested on the
    tiny SD, and ours back into ours by ``test_dora_modules_rebuild_from_each_others_tensors``."""
    case = AlgorithmCase(id="locon", algo="locon", options={"dora_wd": True, "wd_on_output": False},
                         reference_options={"weight_decompose": True, "wd_on_out": False})
    reference_sd = build_tiny_sd()
    reference = reference_network(reference_sd, case)
    _randomize_network(reference.named_parameters())
    path = tmp_path / "reference.safetensors"
    reference.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    ours_sd = build_tiny_sd()
    ours = load_network(path, ours_sd.unet, [ours_sd.text_encoder])
    assert all(adapter.dora and not adapter.dora_on_output for adapter in ours.adapters)
    assert_outputs_changed(reference_sd, build_tiny_sd())
    assert_same_outputs(ours_sd, reference_sd)


def test_a_dora_scale_for_another_layer_is_a_file_error(tmp_path):
    from safetensors.torch import save_file

    sd = build_tiny_sd()
    network = create_network(sd.unet, algo="lora", dim=2)
    state = {key: value.contiguous() for key, value in network.state_dict().items()}
    network.restore()
    state["lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"] = torch.ones(5, 1)
    save_file(state, str(tmp_path / "dora.safetensors"))
    with pytest.raises(AdapterFileError, match="dora_scale"):
        load_network(tmp_path / "dora.safetensors", sd.unet)
