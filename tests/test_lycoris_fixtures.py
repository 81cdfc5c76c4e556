"""Files written by lycoris-lora itself (tests/data/lycoris_files/, made by scripts/lycoris_fixtures.py from every
interop case) load in lycolab with the outputs LyCORIS computed from them, without the package being involved."""

import pytest
import torch
from lycoris_interop import RELATIVE_TOLERANCE, algorithm_cases, model_outputs
from safetensors.torch import load_file

from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import get_algorithm, load_network

FIXTURES = __import__("pathlib").Path(__file__).parent / "data" / "lycoris_files"
CASES = [case for case in algorithm_cases() if case.fixture]


def test_every_case_has_a_fixture_file():
    missing = [case.id for case in CASES if not (FIXTURES / f"{case.id}.safetensors").is_file()]
    assert not missing, f"run scripts/lycoris_fixtures.py {' '.join(missing)}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_file_written_by_lycoris_loads_with_the_outputs_lycoris_computed(case):
    sd = build_tiny_sd()
    network = load_network(FIXTURES / f"{case.id}.safetensors", sd.unet, [sd.text_encoder])
    assert {adapter.algo for adapter in network.adapters} == {get_algorithm(case.algo).name}
    expected = load_file(str(FIXTURES / f"{case.id}.expected.safetensors"))
    for name, got in zip(("text_encoder", "unet"), model_outputs(sd), strict=True):
        error = (got - expected[name]).norm() / expected[name].norm()
        assert error <= RELATIVE_TOLERANCE, f"{name}: relative difference {error:.2e}"
    assert not torch.equal(model_outputs(build_tiny_sd())[1], expected["unet"])
