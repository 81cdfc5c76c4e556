"""Every algorithm × option of the registry (rows in tests/algorithm_cases/) against lycoris-lora 4.1.3 on the tiny SD:
the same modules and shapes, our files in LyCORIS and theirs in ours with the same outputs, and ``ss_network_args``
that rebuild the same network."""

import json
import logging

import pytest
import torch
from lycoris_interop import (
    algorithm_cases,
    assert_outputs_changed,
    assert_same_outputs,
    our_network,
    randomize_network,
    reference_from_file,
    reference_network,
)

from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import create_network, get_algorithm, load_network
from lycolab.networks.args import network_kwargs

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
CASES = algorithm_cases()
IDS = [case.id for case in CASES]


def _shapes(network) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_network_has_the_same_modules_and_shapes_as_lycoris(case):
    ours = our_network(build_tiny_sd(), case)
    reference = reference_network(build_tiny_sd(), case)
    assert _shapes(ours) == _shapes(reference)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_file_we_save_loads_in_lycoris_with_the_same_outputs(case, tmp_path):
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


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_file_saved_by_lycoris_loads_in_ours_with_the_same_outputs(case, tmp_path):
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


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_saved_network_args_rebuild_the_same_network(case, tmp_path):
    sd = build_tiny_sd()
    ours = our_network(sd, case)
    metadata = ours.network_metadata()
    ours.restore()
    args = json.loads(metadata["ss_network_args"])
    kwargs = network_kwargs(metadata["ss_network_module"], int(metadata["ss_network_dim"]),
                            float(metadata["ss_network_alpha"]), args)
    rebuilt = create_network(sd.unet, [sd.text_encoder], **kwargs)
    assert _shapes(rebuilt) == _shapes(ours)
    assert rebuilt.adapters[0].options == ours.adapters[0].options
