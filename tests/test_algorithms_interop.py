"""Every algorithm × option of the registry (rows in tests/algorithm_cases/) against lycoris-lora 4.1.3 on the tiny SD:
the same modules and shapes, our files in LyCORIS and theirs in ours with the same outputs, and ``ss_network_args``
that rebuild the same network."""

import logging

import pytest
from lycoris_interop import (
    algorithm_cases,
    check_lycoris_file_loads_in_ours,
    check_network_args_rebuild_the_network,
    check_our_file_loads_in_lycoris,
    our_network,
    reference_network,
    state_shapes,
)

from lycolab.models.tiny import build_tiny_sd

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
CASES = algorithm_cases()
IDS = [case.id for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_network_has_the_same_modules_and_shapes_as_lycoris(case):
    ours = our_network(build_tiny_sd(), case)
    reference = reference_network(build_tiny_sd(), case)
    assert state_shapes(ours) == state_shapes(reference)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_file_we_save_loads_in_lycoris_with_the_same_outputs(case, tmp_path):
    check_our_file_loads_in_lycoris(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_file_saved_by_lycoris_loads_in_ours_with_the_same_outputs(case, tmp_path):
    check_lycoris_file_loads_in_ours(case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_saved_network_args_rebuild_the_same_network(case):
    check_network_args_rebuild_the_network(case)
