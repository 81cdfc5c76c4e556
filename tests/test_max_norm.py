"""Max-norm regularisation (``scale_weight_norms``) against its two references: sd-scripts' ``networks.lora`` rule
restated below (bit-for-bit equal), and LyCORIS 4.1.3's own ``apply_max_norm`` on modules and networks that
hold the same weights (equal up to float32 rounding, since ΔW is built in another order)."""

import logging
import statistics

import pytest
import torch
from lycoris.kohya import LycorisNetworkKohya
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import AdapterNetwork, create_network
from lycolab.networks.algorithms.loha import LoHaModule
from lycolab.networks.algorithms.lokr import LoKrModule
from lycolab.networks.algorithms.lora import LoRAModule
from lycolab.networks.max_norm import MaxNormResult, apply_max_norm

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

# LyCORIS builds ΔW in another order, so a norm (and the ratio from it) may differ by a few float32 ulps, and it
# averages the norms with a float32 running sum, which over n keys can drift by up to about n/2 ulps (n ≈ 140 on the
# tiny SD). 256 ulps (3e-5) bounds both and is still far below any change max-norm makes. Scaled weights are w·ratio
# on both sides, so their error is relative too: no atol.
RTOL = 256 * torch.finfo(torch.float32).eps


def sd_scripts_apply_max_norm_regularization(state_dict, max_norm_value, device):
    """sd-scripts' max-norm rule (networks/lora.py ``apply_max_norm_regularization``, commit 48d368f), restated
    here as the reference: ΔW = up·down (1x1 convs as matrices, 3x3 through conv2d) times alpha/dim; the norm is
    clamped below at half the limit, ratio = min(norm, limit) / norm, and a key with ratio != 1 gets √ratio on both
    its up and down; returns (keys scaled, mean and max of the scaled norms)."""
    scaled, norms = 0, []
    for down_key in [key for key in state_dict if key.endswith("lora_down.weight")]:
        prefix = down_key[: -len("lora_down.weight")]
        up_key = prefix + "lora_up.weight"
        down, up = state_dict[down_key].to(device), state_dict[up_key].to(device)
        if down.dim() == 2:
            delta = up @ down
        elif up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
            delta = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
        else:
            delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        delta = delta * (state_dict[prefix + "alpha"].to(device) / down.shape[0])
        norm = delta.norm().clamp(min=max_norm_value / 2)
        ratio = norm.clamp(max=max_norm_value).cpu() / norm.cpu()
        if ratio != 1:
            scaled += 1
            state_dict[up_key] *= ratio**0.5
            state_dict[down_key] *= ratio**0.5
        norms.append((delta.norm() * ratio).item())
    return scaled, sum(norms) / len(norms), max(norms)


def _randomize(parameters, seed=5, std=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def _snapshot(network):
    return {key: value.detach().clone() for key, value in network.state_dict().items()}


def _limit_between_norms(network):
    """A limit that about half the keys exceed, with no ‖ΔW‖ within 1% of it (a rounding-sized difference there
    could flip a key between the two implementations)."""
    with torch.no_grad():
        norms = sorted(adapter.delta_weight().norm().item() for adapter in network.adapters)
    limit = statistics.median(norms)
    while any(abs(norm - limit) < 0.01 * limit for norm in norms):
        limit *= 1.013
    return limit


LORA_LAYERS = {
    "linear": lambda: nn.Linear(64, 96),
    "conv1x1": lambda: nn.Conv2d(32, 48, 1),
    "conv3x3": lambda: nn.Conv2d(32, 48, 3, padding=1),
}


def _lora_network(kind):
    """Six LoRA modules of one layer kind, alphas and magnitudes varied so that some exceed a limit and some not."""
    adapters = []
    for index in range(6):
        adapter = LoRAModule(f"lora_unet_m{index}", LORA_LAYERS[kind](), 4, (1.0, 4.0, 2.5)[index % 3])
        _randomize(adapter.parameters(), seed=index, std=0.1 * (1 + index))
        adapters.append(adapter)
    return AdapterNetwork(adapters, "lora", "networks.lora", {})


@pytest.mark.parametrize("kind", LORA_LAYERS)
def test_lora_and_locon_are_scaled_bit_for_bit_as_sd_scripts_does(kind):
    network = _lora_network(kind)
    limit = _limit_between_norms(network)
    expected_state = _snapshot(network)
    expected = sd_scripts_apply_max_norm_regularization(expected_state, limit, "cpu")
    before = _snapshot(network)

    result = apply_max_norm(network, limit)

    assert (result.keys_scaled, result.average_key_norm, result.max_key_norm) == expected
    assert 0 < result.keys_scaled < len(network.adapters)
    for key, value in network.state_dict().items():
        assert torch.equal(value, expected_state[key]), key
    assert any(not torch.equal(value, before[key]) for key, value in network.state_dict().items())


def test_whole_tiny_sd_lora_network_with_conv_matches_sd_scripts():
    sd = build_tiny_sd()
    network = create_network(sd.unet, [sd.text_encoder], algo="lora", dim=4, alpha=2, conv_dim=2, conv_alpha=1,
                             network_module="networks.lora")
    _randomize(network.parameters())
    limit = _limit_between_norms(network)
    expected_state = _snapshot(network)
    expected = sd_scripts_apply_max_norm_regularization(expected_state, limit, "cpu")

    result = apply_max_norm(network, limit)

    assert (result.keys_scaled, result.average_key_norm, result.max_key_norm) == expected
    assert 0 < result.keys_scaled < len(network.adapters)
    for key, value in network.state_dict().items():
        assert torch.equal(value, expected_state[key]), key


def test_scaled_keys_end_at_the_limit_and_the_rest_keep_their_norm():
    network = _lora_network("conv3x3")
    limit = _limit_between_norms(network)
    with torch.no_grad():
        norms_before = [adapter.delta_weight().norm().item() for adapter in network.adapters]
        apply_max_norm(network, limit)
        norms_after = [adapter.delta_weight().norm().item() for adapter in network.adapters]
    for before, after in zip(norms_before, norms_after, strict=True):
        assert after == pytest.approx(min(before, limit), rel=RTOL)


@pytest.mark.parametrize("network_module", ["networks.lora", "lycoris.kohya"])
def test_modules_under_the_limit_are_untouched_bit_for_bit(network_module):
    adapters = [LoRAModule("lora_unet_linear", nn.Linear(64, 96), 4, 2.0),
                LoRAModule("lora_unet_conv", nn.Conv2d(32, 48, 3, padding=1), 4, 1.0),
                LoHaModule("lora_unet_loha", nn.Linear(64, 96), 4, 2.0),
                LoKrModule("lora_unet_lokr", nn.Linear(64, 96), 2, 1.0)]
    if network_module == "networks.lora":
        adapters = adapters[:2]
    network = AdapterNetwork(adapters, "lora", network_module, {})
    _randomize(network.parameters())
    with torch.no_grad():
        norms = [adapter.delta_weight().norm().item() for adapter in adapters]
    before = _snapshot(network)
    pointers = [parameter.data_ptr() for parameter in network.parameters()]

    # Above every norm, and (2x) one where the small keys are lifted to the limit/2 floor: neither scales anything.
    for limit in (1.5 * max(norms), 2.5 * max(norms)):
        result = apply_max_norm(network, limit)
        assert result.keys_scaled == 0
        for key, value in network.state_dict().items():
            assert torch.equal(value, before[key]), key
    assert [parameter.data_ptr() for parameter in network.parameters()] == pointers
    if network_module == "networks.lora":  # sd-scripts still reports every key's norm
        assert result.average_key_norm == pytest.approx(sum(norms) / len(norms), rel=RTOL)
        assert result.max_key_norm == pytest.approx(max(norms), rel=RTOL)
    else:  # LyCORIS reports (0, 0, 0) when nothing was scaled
        assert result == MaxNormResult(0, 0.0, 0.0)


# (our class, LyCORIS class, layer, dim, alpha, options), as in test_networks_reference.py
LYCORIS_CASES = {
    "locon-linear": (LoRAModule, LoConModule, lambda: nn.Linear(64, 96), 4, 2.0, {}),
    "locon-conv1x1": (LoRAModule, LoConModule, lambda: nn.Conv2d(32, 48, 1), 4, 8.0, {}),
    "locon-conv3x3": (LoRAModule, LoConModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 1.0, {}),
    "locon-tucker": (LoRAModule, LoConModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 2.0, {"use_tucker": True}),
    "loha-linear": (LoHaModule, LohaModule, lambda: nn.Linear(64, 96), 4, 2.0, {}),
    "loha-conv3x3": (LoHaModule, LohaModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 4, 1.0, {}),
    "loha-tucker": (LoHaModule, LohaModule, lambda: nn.Conv2d(32, 48, 3, padding=1), 3, 1.5, {"use_tucker": True}),
    "lokr-linear": (LoKrModule, LokrModule, lambda: nn.Linear(64, 96), 2, 1.0, {}),
    "lokr-full-matrices": (LoKrModule, LokrModule, lambda: nn.Linear(64, 96), 16, 4.0, {}),
    "lokr-decompose-both": (LoKrModule, LokrModule, lambda: nn.Linear(320, 640), 2, 1.0,
                            {"decompose_both": True, "factor": 16}),
    "lokr-conv3x3": (LoKrModule, LokrModule, lambda: nn.Conv2d(64, 128, 3, padding=1), 2, 1.0, {}),
    "lokr-tucker": (LoKrModule, LokrModule, lambda: nn.Conv2d(64, 128, 3, padding=1), 2, 1.0, {"use_tucker": True}),
}


def _lycoris_pair(case):
    our_class, reference_class, make_layer, dim, alpha, options = LYCORIS_CASES[case]
    ours = our_class("m", make_layer(), dim, alpha, **options)
    _randomize(ours.parameters(), std=0.2)
    reference = reference_class("m", make_layer(), 1.0, dim, alpha, **options)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


@pytest.mark.parametrize("case", LYCORIS_CASES)
def test_lycoris_modules_are_scaled_as_lycoris_own_apply_max_norm_does(case):
    ours, reference = _lycoris_pair(case)
    with torch.no_grad():
        limit = 0.6 * ours.delta_weight().norm().item()

    scaled, norm = reference.apply_max_norm(limit)
    result = apply_max_norm(AdapterNetwork([ours], ours.algo, "lycoris.kohya", {}), limit)

    assert bool(scaled) and result.keys_scaled == 1
    assert result.average_key_norm == result.max_key_norm == pytest.approx(norm.item(), rel=RTOL)
    expected_state = reference.state_dict()  # LyCORIS folds its scalar into lora_up / hada_w1_a here
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected_state[key], rtol=RTOL, atol=0, msg=key)


def test_lokr_spreads_the_ratio_evenly_over_its_factors():
    ours, _ = _lycoris_pair("lokr-tucker")
    before = {name: factor.detach().clone() for name, factor in zip(
        ("w1", "w2_a", "w2_b", "t2"), (ours.lokr_w1, ours.lokr_w2_a, ours.lokr_w2_b, ours.lokr_t2), strict=True)}
    with torch.no_grad():
        norm = ours.delta_weight().norm().item()
    apply_max_norm(AdapterNetwork([ours], "lokr", "lycoris.kohya", {}), 0.5 * norm)
    root = (0.5 * norm / norm) ** (1 / 4)
    for name, value in before.items():
        torch.testing.assert_close(getattr(ours, f"lokr_{name}").detach(), value * root, rtol=RTOL, atol=0, msg=name)


# LyCORIS' "full" preset for SD 1.x (see test_networks_interop.py for why it is spelled out).
FULL_PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"],
    "unet_target_name": ["conv_in", "conv_out"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}


class TextModel(nn.Module):
    """transformers 5 dropped CLIPTextModel.text_model; the reference names modules from the attribute path."""

    def __init__(self, encoder):
        super().__init__()
        self.text_model = encoder


@pytest.mark.parametrize(("algo", "options"), [("lora", {}), ("loha", {}), ("lokr", {"factor": 4})])
def test_whole_tiny_sd_lycoris_network_matches_lycoris_network(algo, options):
    ours_sd, reference_sd = build_tiny_sd(), build_tiny_sd()
    ours = create_network(ours_sd.unet, [ours_sd.text_encoder], algo=algo, dim=4, alpha=2, conv_dim=2, conv_alpha=1,
                          network_module="lycoris.kohya", **options)
    LycorisNetworkKohya.apply_preset(FULL_PRESET)
    reference = LycorisNetworkKohya(TextModel(reference_sd.text_encoder), reference_sd.unet, multiplier=1.0,
                                    lora_dim=4, conv_lora_dim=2, alpha=2, conv_alpha=1, network_module=algo, **options)
    reference.apply_to(reference_sd.text_encoder, reference_sd.unet, True, True)  # registers its modules by name
    _randomize(ours.parameters())
    reference.load_state_dict(ours.state_dict())
    limit = _limit_between_norms(ours)

    keys_scaled, average, maximum = reference.apply_max_norm_regularization(limit, "cpu")
    result = apply_max_norm(ours, limit)

    assert 0 < result.keys_scaled == int(keys_scaled) < len(ours.adapters)
    assert result.average_key_norm == pytest.approx(float(average), rel=RTOL)
    assert result.max_key_norm == pytest.approx(float(maximum), rel=RTOL)
    expected_state = reference.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected_state[key], rtol=RTOL, atol=0, msg=key)


def test_result_names_the_keys_sd_scripts_logs():
    result = MaxNormResult(3, 0.5, 0.9)
    assert result.logs() == {"max_norm/keys_scaled": 3, "max_norm/max_key_norm": 0.9, "norm/avg_key_norm": 0.5}
    assert result.postfix() == {"Keys Scaled": 3, "Average key norm": 0.5}


@pytest.mark.parametrize("limit", [0.0, -1.0, float("nan"), float("inf")])
def test_a_limit_that_is_not_a_positive_number_is_refused(limit):
    network = _lora_network("linear")
    with pytest.raises(ValueError, match="scale_weight_norms"):
        apply_max_norm(network, limit)


def test_an_empty_network_reports_zeros():
    assert apply_max_norm(AdapterNetwork([], "lora", "networks.lora", {}), 1.0) == MaxNormResult(0, 0.0, 0.0)


def test_training_with_scale_weight_norms_keeps_every_saved_key_at_or_under_the_limit(tiny_model_dir, tmp_path):
    from conftest import make_shapes_dataset
    from safetensors import safe_open

    from lycolab.config import load_config
    from lycolab.training import train

    data = make_shapes_dataset(tmp_path / "train")

    def run(out, **extra):
        config = load_config(overrides={
            "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(data), "resolution": "64",
            "network_dim": 4, "network_alpha": 4, "learning_rate": 5e-2, "max_train_steps": 4, "seed": 2,
            "network_args": ["conv_dim=2", "conv_alpha=2"], "output_dir": str(out), "save_precision": "float",
            **extra})
        path = train(config, progress=False).saved_files[-1]
        with safe_open(str(path), "pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata()
        norms = sd_scripts_apply_max_norm_regularization(dict(state), 1e30, "cpu")  # measures only
        return norms, metadata

    (_, _, free_max), _ = run(tmp_path / "free")
    limit = free_max / 2  # the unregularised run has keys well above it
    (_, _, held_max), metadata = run(tmp_path / "held", scale_weight_norms=limit)
    assert held_max <= limit * (1 + 8 * torch.finfo(torch.float32).eps)
    assert metadata["ss_scale_weight_norms"] == str(limit)
