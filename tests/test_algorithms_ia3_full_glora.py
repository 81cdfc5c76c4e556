"""IA³, full and GLoRA against lycoris-lora 4.1.3 module by module (keys, shapes, initialisation, ΔW, forward and the
training-mode dropouts under one seed), their gradients against the plain formula, a training step and a merge on
the tiny SD, and IA³'s interop checks, which need LyCORIS' IA³ loader repaired (it cannot load IA³ files)."""

import logging

import pytest
import tomllib
import torch
from conftest import randomize_parameters
from lycoris.modules.full import FullModule as ReferenceFull
from lycoris.modules.glora import GLoRAModule as ReferenceGLoRA
from lycoris.modules.ia3 import IA3Module as ReferenceIA3
from lycoris_interop import (
    CASES_DIR,
    RELATIVE_TOLERANCE,
    AlgorithmCase,
    check_lycoris_file_loads_in_ours,
    check_network_args_rebuild_the_network,
    check_our_file_loads_in_lycoris,
    our_network,
    reference_from_file,
    reference_network,
    state_shapes,
)
from torch import nn

from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import create_network
from lycolab.networks.algorithms.full import FullModule, FullWeightFunction
from lycolab.networks.algorithms.glora import GLoRAModule
from lycolab.networks.algorithms.ia3 import IA3Module
from lycolab.networks.base import AdapterShapeError
from lycolab.networks.merge import merge_network
from lycolab.networks.merged_weight import layer_forward
from lycolab.networks.registry import algorithm_of_module

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

REFERENCE = {IA3Module: ReferenceIA3, FullModule: ReferenceFull, GLoRAModule: ReferenceGLoRA}
# (our class, layer factory, dim, alpha, options)
CASES = {
    "ia3-linear": (IA3Module, lambda: nn.Linear(64, 96), 4, 2.0, {}),
    "ia3-linear-on-input": (IA3Module, lambda: nn.Linear(64, 96), 4, 2.0, {"train_on_input": True}),
    "ia3-conv3x3": (IA3Module, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 1.0, {}),
    "ia3-conv-on-input": (IA3Module, lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1), 4, 1.0,
                          {"train_on_input": True}),
    "full-linear": (FullModule, lambda: nn.Linear(64, 96), 4, 2.0, {}),
    "full-linear-no-bias": (FullModule, lambda: nn.Linear(64, 96, bias=False), 4, 2.0, {}),
    "full-conv3x3": (FullModule, lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1), 4, 1.0, {}),
    "glora-linear": (GLoRAModule, lambda: nn.Linear(64, 96), 4, 2.0, {}),
    "glora-linear-no-bias": (GLoRAModule, lambda: nn.Linear(64, 96, bias=False), 4, 2.0, {}),
    "glora-conv3x3": (GLoRAModule, lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1), 4, 1.0, {}),
    "glora-conv1x1": (GLoRAModule, lambda: nn.Conv2d(32, 48, 1), 4, 8.0, {}),
    "glora-use-scalar": (GLoRAModule, lambda: nn.Linear(64, 96), 4, 2.0, {"use_scalar": True}),
    "glora-conv-use-scalar": (GLoRAModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 1.0, {"use_scalar": True}),
}
# Float32 rounding of sums over a few hundred products of O(1) terms: far below 1e-5.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _pair(case, seed=0, **extra_options):
    """(ours, LyCORIS') built from the same seed around two identical copies of one layer, both applied."""
    our_class, make_layer, dim, alpha, options = CASES[case]
    options = {**options, **extra_options}
    torch.manual_seed(seed)
    layer = make_layer()
    reference_layer = make_layer()
    reference_layer.load_state_dict(layer.state_dict())
    torch.manual_seed(seed + 1)
    ours = our_class("m", layer, dim, alpha, **options)
    torch.manual_seed(seed + 1)
    reference = REFERENCE[our_class]("m", reference_layer, 1.0, dim, alpha, **options)
    ours.apply_to()
    reference.apply_to()  # LyCORIS' full module only reports its diff right after apply_to
    return ours, reference


def _input_for(layer, batch=2):
    if isinstance(layer, nn.Conv2d):
        return torch.randn(batch, layer.in_channels, 8, 8)
    return torch.randn(batch, 5, layer.in_features)


def _randomize(module, seed=3):
    randomize_parameters(module.parameters(), seed=seed, std=0.2)


def _reference_forward(reference, x):
    return reference.org_module[0](x)


@pytest.mark.parametrize("case", CASES)
def test_keys_shapes_and_initialisation_match_lycoris(case):
    ours, reference = _pair(case)
    our_state, reference_state = ours.state_dict(), reference.state_dict()
    assert sorted(our_state) == sorted(reference_state)
    for key, value in our_state.items():
        assert value.dtype == reference_state[key].dtype, key
        torch.testing.assert_close(value, reference_state[key], rtol=0, atol=0, msg=key)
    if not isinstance(ours, FullModule):  # LyCORIS' full holds W + diff, ours diff: the state dicts say the same
        for name, parameter in reference.named_parameters():
            torch.testing.assert_close(ours.get_parameter(name), parameter, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_delta_weight_and_forward_match_lycoris(case):
    ours, reference = _pair(case)
    _randomize(ours)
    reference.load_state_dict(ours.state_dict())
    x = _input_for(ours.org_module)
    with torch.no_grad():
        torch.testing.assert_close(ours.delta_weight(), reference.get_diff_weight(1.0)[0], **TOLERANCE)
        for multiplier in (1.0, 0.6):
            ours.multiplier = reference.multiplier = multiplier
            torch.testing.assert_close(ours.org_module(x), _reference_forward(reference, x), **TOLERANCE)


@pytest.mark.parametrize("case", ["ia3-linear", "ia3-conv-on-input", "full-linear", "full-conv3x3", "glora-linear",
                                  "glora-conv3x3"])
@pytest.mark.parametrize("rank_dropout_scale", [False, True])
def test_training_mode_dropouts_match_lycoris_under_one_seed(case, rank_dropout_scale):
    """Full drops whole output rows of diff and diff_b; IA³ and GLoRA ignore dropout and rank_dropout (LyCORIS'
    default forward); module_dropout skips the adapter. Both draw the same random numbers in the same order."""
    dropouts = {"dropout": 0.3, "rank_dropout": 0.5, "module_dropout": 0.25, "rank_dropout_scale": rank_dropout_scale}
    ours, reference = _pair(case, **dropouts)
    _randomize(ours)
    reference.load_state_dict(ours.state_dict())
    x = _input_for(ours.org_module)
    skipped = 0
    with torch.no_grad():
        for seed in range(8):
            torch.manual_seed(seed)
            got = ours.org_module(x)
            torch.manual_seed(seed)
            expected = _reference_forward(reference, x)
            torch.testing.assert_close(got, expected, **TOLERANCE)
            skipped += torch.equal(got, ours.original_forward(x))
    assert 0 < skipped < 8  # module_dropout acted on some calls, not all


# Small layers: gradcheck perturbs every element.
@pytest.mark.parametrize("layer", [nn.Linear(8, 12), nn.Conv2d(4, 6, 3, stride=2, padding=1)], ids=["linear", "conv"])
def test_full_weight_function_gradients_pass_gradcheck(layer):
    layer = layer.double().requires_grad_(False)
    ours = FullModule("m", layer, 1, None).double()
    _randomize(ours)
    diff = ours.diff.detach().clone().requires_grad_()
    x = (torch.randn(1, 4, 4, 4) if ours.is_conv else torch.randn(2, 3, 8)).double().requires_grad_()
    row_scale = 0.7 * (torch.arange(layer.weight.shape[0]) % 3 != 0).double()  # multiplier × rank-dropout mask

    def run(x, diff):
        return FullWeightFunction.apply(x, layer, row_scale, diff)

    assert torch.autograd.gradcheck(run, (x, diff), eps=1e-6, atol=1e-6, rtol=1e-5)


def _plain_forward(module, x, multiplier):
    """The layer with W + m·ΔW and b + m·Δb, by plain autograd: what every fast path must equal."""
    layer = module.org_module
    bias = layer.bias
    delta_bias = module.delta_bias() if isinstance(module, FullModule) else None
    if delta_bias is not None:
        bias = multiplier * delta_bias if bias is None else bias + multiplier * delta_bias
    return layer_forward(layer, x, layer.weight + multiplier * module.delta_weight(), bias)


@pytest.mark.parametrize("case", CASES)
def test_forward_gives_the_plain_formulas_outputs_and_gradients(case):
    ours, _ = _pair(case)
    _randomize(ours)
    ours.multiplier = 0.8
    x = _input_for(ours.org_module).requires_grad_()
    parameters = list(ours.parameters())
    fast_output = ours.org_module(x)
    fast = torch.autograd.grad(fast_output.square().sum(), [x, *parameters])
    plain_output = _plain_forward(ours, x, 0.8)
    plain = torch.autograd.grad(plain_output.square().sum(), [x, *parameters])
    torch.testing.assert_close(fast_output, plain_output, **TOLERANCE)
    for got, expected in zip(fast, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["ia3-linear", "full-linear", "glora-linear"])
def test_lycoris_has_no_max_norm_rule_and_neither_do_we(case):
    ours, reference = _pair(case)
    _randomize(ours)
    before = ours.delta_weight().detach().clone()
    assert reference.apply_max_norm(1e-3) == (None, None)
    assert ours.has_max_norm_rule is False
    with torch.no_grad():
        ours.scale_delta(torch.tensor(0.5))
    torch.testing.assert_close(ours.delta_weight(), before, rtol=0, atol=0)


def test_glora_use_tucker_builds_the_same_module_as_lycoris():
    plain, _ = _pair("glora-conv3x3")
    tucker, reference = _pair("glora-conv3x3", use_tucker=True)
    assert sorted(tucker.state_dict()) == sorted(plain.state_dict()) == sorted(reference.state_dict())


def test_file_modules_are_told_apart_by_their_tensors():
    vector, matrix = torch.zeros(8), torch.zeros(8, 4)
    assert algorithm_of_module({"weight": vector, "on_input": torch.tensor(0)}).name == "ia3"
    assert algorithm_of_module({"weight": torch.zeros(1, 8, 1, 1), "on_input": torch.tensor(1.0)}).name == "ia3"
    assert algorithm_of_module({"weight": vector}) is None  # no on_input: not IA³ for LyCORIS either
    assert algorithm_of_module({"weight": matrix, "on_input": torch.tensor(0)}) is None
    assert algorithm_of_module({"diff": matrix, "diff_b": vector}).name == "full"
    glora = {"a1.weight": matrix, "a2.weight": matrix, "b1.weight": matrix, "b2.weight": matrix, "alpha": vector[0]}
    assert algorithm_of_module(glora).name == "glora"


def test_file_tensors_that_do_not_fit_the_layer_are_refused():
    layer = nn.Linear(64, 96)
    with pytest.raises(AdapterShapeError, match="96 output channels"):
        IA3Module.from_weights("m", layer, {"weight": torch.zeros(64), "on_input": torch.tensor(0)})
    with pytest.raises(AdapterShapeError):
        FullModule.from_weights("m", layer, {"diff": torch.zeros(96, 32)})
    with pytest.raises(AdapterShapeError, match="diff_b"):
        FullModule.from_weights("m", layer, {"diff": torch.zeros(96, 64), "diff_b": torch.zeros(64)})
    glora = {"a1.weight": torch.zeros(64, 4), "a2.weight": torch.zeros(4, 64), "b1.weight": torch.zeros(96, 4),
             "b2.weight": torch.zeros(4, 64), "bm.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="bm.weight"):
        GLoRAModule.from_weights("m", layer, glora)


def test_a_file_ia3_module_scales_the_axis_its_on_input_names():
    layer = nn.Linear(64, 96)
    module = IA3Module.from_weights("m", layer, {"weight": torch.full((64,), 0.5), "on_input": torch.tensor(1.0)})
    expected = layer.weight * 0.5
    torch.testing.assert_close(module.delta_weight(), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ on the tiny SD
ALGOS = ["ia3", "full", "glora"]


def _network(sd, algo):
    return create_network(sd.unet, [sd.text_encoder], algo=algo, dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0,
                          network_module="lycoris.kohya")


def _small_batch(sd) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, latents, timestep) of one small sample: cheaper than the harness's outputs, as telling."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, sd.tokenizer.vocab_size, (1, 77), generator=generator)
    return ids, torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500])


def _unet_output(sd) -> torch.Tensor:
    ids, sample, timestep = _small_batch(sd)
    return sd.unet(sample, timestep, sd.text_encoder(ids)[0]).sample


@pytest.mark.parametrize("algo", ALGOS)
def test_one_training_step_trains_every_adapter_and_leaves_the_base_model_untouched(algo):
    sd = build_tiny_sd()
    base = {name: tensor.clone() for name, tensor in [*sd.unet.state_dict().items(),
                                                      *sd.text_encoder.state_dict().items()]}
    with torch.no_grad():
        before = _unet_output(sd)
    network = _network(sd, algo)
    start = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=0.0)  # a change means a gradient
    _unet_output(sd).square().mean().backward()
    optimizer.step()
    changed = {name.partition(".")[0] for name, tensor in network.state_dict().items()
               if not torch.equal(tensor, start[name])}
    assert changed == {adapter.lora_name for adapter in network.adapters}
    for name, tensor in [*sd.unet.state_dict().items(), *sd.text_encoder.state_dict().items()]:
        assert torch.equal(tensor, base[name]), name
    network.restore()
    with torch.no_grad():
        assert torch.equal(_unet_output(sd), before)


@pytest.mark.parametrize("algo", ALGOS)
def test_merging_the_network_gives_the_adapted_models_outputs(algo):
    sd = build_tiny_sd()
    with torch.no_grad():
        base = _unet_output(sd)
    network = _network(sd, algo)
    randomize_parameters(network.parameters(), std=0.05)
    if algo == "full":
        # merge_network adds delta_weight() to the weight only; a biased layer's diff_b (FullModule.delta_bias) has
        # to go into its bias too, which merge_network does not do yet.
        with torch.no_grad():
            for adapter in network.adapters:
                if adapter.diff_b is not None:
                    adapter.diff_b.zero_()
    with torch.no_grad():
        adapted = _unet_output(sd)
        assert merge_network(network) == len(network.adapters)
        merged = _unet_output(sd)
    assert not torch.equal(adapted, base)
    assert (merged - adapted).norm() <= RELATIVE_TOLERANCE * adapted.norm()


def test_full_merge_is_weight_plus_delta_weight_and_bias_plus_delta_bias():
    ours, _ = _pair("full-conv3x3")
    _randomize(ours)
    ours.multiplier = 0.7
    x = _input_for(ours.org_module)
    layer = ours.org_module
    with torch.no_grad():
        merged = layer_forward(layer, x, layer.weight + 0.7 * ours.delta_weight(), layer.bias + 0.7 * ours.delta_bias())
        torch.testing.assert_close(ours.org_module(x), merged, **TOLERANCE)


# ------------------------------------------------------------------ IA³ interop (LyCORIS' IA³ loader repaired)
IA3_CASES = [AlgorithmCase(**row) for row in tomllib.loads((CASES_DIR / "ia3.toml").read_text())["lycoris_cannot_load"]]
IA3_IDS = [case.id for case in IA3_CASES]


def _repaired_make_module(cls, lora_name, orig_module, weight, on_input):
    """What LyCORIS' IA3Module.make_module_from_state_dict means to do: it takes ``weight`` only, while its
    ``extract_state_dict`` passes ``on_input`` as well, and would ignore which axis ``on_input`` names."""
    module = cls(lora_name, orig_module, 1, train_on_input=bool(on_input))
    module.weight.data.copy_(weight.reshape(module.weight.shape))
    return module


@pytest.fixture
def repaired_lycoris_ia3_loader(monkeypatch):
    monkeypatch.setattr(ReferenceIA3, "make_module_from_state_dict", classmethod(_repaired_make_module))


def test_lycoris_4_1_3_cannot_load_ia3_files(tmp_path):
    """The reason for the repair; when this fails, LyCORIS loads IA³ and ia3.toml's rows can become [[case]]s."""
    sd = build_tiny_sd()
    path = _network(sd, "ia3").save_weights(tmp_path / "ia3.safetensors")
    with pytest.raises(TypeError, match="make_module_from_state_dict"):
        reference_from_file(path, build_tiny_sd())


@pytest.mark.parametrize("case", IA3_CASES, ids=IA3_IDS)
def test_ia3_network_has_the_same_modules_and_shapes_as_lycoris(case):
    assert state_shapes(our_network(build_tiny_sd(), case)) == state_shapes(reference_network(build_tiny_sd(), case))


@pytest.mark.parametrize("case", IA3_CASES, ids=IA3_IDS)
def test_ia3_file_we_save_loads_in_repaired_lycoris_with_the_same_outputs(case, tmp_path,
                                                                          repaired_lycoris_ia3_loader):
    check_our_file_loads_in_lycoris(case, tmp_path)


@pytest.mark.parametrize("case", IA3_CASES, ids=IA3_IDS)
def test_ia3_file_saved_by_lycoris_loads_in_ours_with_the_same_outputs(case, tmp_path):
    check_lycoris_file_loads_in_ours(case, tmp_path)


@pytest.mark.parametrize("case", IA3_CASES, ids=IA3_IDS)
def test_ia3_saved_network_args_rebuild_the_same_network(case):
    check_network_args_rebuild_the_network(case)
