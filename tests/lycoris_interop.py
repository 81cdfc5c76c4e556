"""Our networks beside the reference ``lycoris-lora`` package on the tiny SD: the shared harness of the interop tests.

Cases live in ``tests/algorithm_cases/<algorithm>.toml`` (one file per algorithm, each ``[[case]]`` an algorithm with
its options), so adding an algorithm adds its rows there and every parametrised interop test covers it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
import torch
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from torch import nn

from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import create_network, get_algorithm, load_network
from lycolab.networks.args import network_kwargs

CASES_DIR = Path(__file__).parent / "algorithm_cases"
# LyCORIS' "full" preset as it is meant for SD 1.x/2.x. 4.1.3's own list also names conv_in-style layers twice
# (TimestepEmbedding as a block and its linears by name), which makes its constructor fail on diffusers U-Nets.
FULL_PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"],
    "unet_target_name": ["conv_in", "conv_out"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}
# Outputs agree to this fraction of their norm: float32 rounding through the tiny U-Net, not a tuned number.
RELATIVE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class AlgorithmCase:
    """One row: an algorithm, its dims and options (``network_args`` names), as both packages build it."""

    id: str
    algo: str
    dim: int = 4
    alpha: float = 2.0
    conv_dim: int = 2
    conv_alpha: float = 1.0
    options: dict = field(default_factory=dict)  # our create_network options (typed)
    reference_options: dict | None = None  # LyCORIS' constructor arguments, when they are spelled differently
    preset: dict | None = None  # a LyCORIS preset instead of FULL_PRESET
    fixture: bool = True  # whether scripts/lycoris_fixtures.py writes a LyCORIS-made file for it (false: it cannot)

    @property
    def lycoris_options(self) -> dict:
        return dict(self.options if self.reference_options is None else self.reference_options)


def randomize_network(network, seed: int = 5, std: float = 0.1) -> None:
    """Non-zero adapter weights, the same on every machine: N(0, std) draws, except DoRA's ``dora_scale``, which
    keeps its start (the weight's norms) times 1 + N(0, std) — small magnitudes would make W' a difference of large
    numbers and measure the reference's float32 cancellation instead of the algorithm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * std
            if name.endswith("dora_scale"):
                parameter.mul_(1 + noise)
            else:
                parameter.copy_(noise)


def algorithm_cases() -> list[AlgorithmCase]:
    """Every case of every ``algorithm_cases/*.toml``, in file order."""
    cases = []
    for path in sorted(CASES_DIR.glob("*.toml")):
        for row in tomllib.loads(path.read_text())["case"]:
            cases.append(AlgorithmCase(**row))
    return cases


class TextModel(nn.Module):
    """transformers 5 dropped CLIPTextModel.text_model; the reference names modules from the attribute path."""

    def __init__(self, encoder):
        super().__init__()
        self.text_model = encoder


def reference_network(sd, case: AlgorithmCase):
    """LyCORIS' network for the case, applied to ``sd``."""
    LycorisNetworkKohya.apply_preset(case.preset or FULL_PRESET)
    network = LycorisNetworkKohya(TextModel(sd.text_encoder), sd.unet, multiplier=1.0, lora_dim=case.dim,
                                  conv_lora_dim=case.conv_dim, alpha=case.alpha, conv_alpha=case.conv_alpha,
                                  network_module=case.algo, **case.lycoris_options)
    network.apply_to(sd.text_encoder, sd.unet, True, True)
    return network


def reference_from_file(path, sd, multiplier=1.0, preset: dict | None = None):
    """(LyCORIS network, weights) rebuilt from a file, not yet applied."""
    LycorisNetworkKohya.apply_preset(preset or FULL_PRESET)
    return create_network_from_weights(multiplier, str(path), None, TextModel(sd.text_encoder), sd.unet)


def our_network(sd, case: AlgorithmCase):
    return create_network(sd.unet, [sd.text_encoder], algo=case.algo, dim=case.dim, alpha=case.alpha,
                          conv_dim=case.conv_dim, conv_alpha=case.conv_alpha, network_module="lycoris.kohya",
                          **case.options)


@torch.no_grad()
def model_outputs(sd) -> tuple[torch.Tensor, torch.Tensor]:
    """(text encoder states, U-Net output) for fixed inputs: what an adapter changes."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sd.tokenizer.vocab_size, (2, 77), generator=generator)
    context = sd.text_encoder(ids)[0]
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    return context, sd.unet(sample, torch.tensor([10, 700]), context).sample


def assert_same_outputs(first, second, relative: float = RELATIVE_TOLERANCE) -> None:
    """Both models give the same outputs, to ``relative`` of the output's norm."""
    for name, got, expected in zip(("text encoder", "unet"), model_outputs(first), model_outputs(second),
                                   strict=True):
        error = (got - expected).norm() / expected.norm()
        assert error <= relative, f"{name}: relative difference {error:.2e} > {relative:.0e}"


def assert_outputs_changed(adapted, base) -> None:
    """The adapter does something (a test of equal outputs proves nothing if ΔW is zero)."""
    assert not torch.equal(model_outputs(adapted)[1], model_outputs(base)[1])


# ---- the checks every case runs (tests/test_algorithms_interop.py; IA3's own file runs them with LyCORIS' loader
# repaired)


def state_shapes(network) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


def check_our_file_loads_in_lycoris(case: AlgorithmCase, tmp_path) -> None:
    """Our network, given random weights and saved, loads in LyCORIS with the same outputs."""
    ours_sd = build_tiny_sd()
    ours = our_network(ours_sd, case)
    randomize_network(ours)
    path = ours.save_weights(tmp_path / f"{case.id}.safetensors", dtype=torch.float32)
    reference_sd = build_tiny_sd()
    reference, _ = reference_from_file(path, reference_sd, preset=case.preset)
    reference.apply_to(reference_sd.text_encoder, reference_sd.unet, True, True)
    assert len(reference.loras) == len(ours.adapters)
    assert_outputs_changed(ours_sd, build_tiny_sd())
    assert_same_outputs(ours_sd, reference_sd)


def check_lycoris_file_loads_in_ours(case: AlgorithmCase, tmp_path) -> None:
    """LyCORIS' network, given random weights and saved, loads in ours as this algorithm with the same outputs."""
    reference_sd = build_tiny_sd()
    reference = reference_network(reference_sd, case)
    randomize_network(reference)
    path = tmp_path / f"reference_{case.id}.safetensors"
    reference.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    ours_sd = build_tiny_sd()
    ours = load_network(path, ours_sd.unet, [ours_sd.text_encoder])
    assert len(ours.adapters) == len(reference.loras)
    assert {adapter.algo for adapter in ours.adapters} == {get_algorithm(case.algo).name}
    assert_outputs_changed(reference_sd, build_tiny_sd())
    assert_same_outputs(ours_sd, reference_sd)


def check_network_args_rebuild_the_network(case: AlgorithmCase) -> None:
    """The ``ss_network_args`` we write rebuild a network of the same shapes and options."""
    sd = build_tiny_sd()
    ours = our_network(sd, case)
    metadata = ours.network_metadata()
    ours.restore()
    kwargs = network_kwargs(metadata["ss_network_module"], int(metadata["ss_network_dim"]),
                            float(metadata["ss_network_alpha"]), json.loads(metadata["ss_network_args"]))
    rebuilt = create_network(sd.unet, [sd.text_encoder], **kwargs)
    assert state_shapes(rebuilt) == state_shapes(ours)
    assert rebuilt.adapters[0].options == ours.adapters[0].options
