"""The algorithm registry: every algorithm describes itself completely, is covered by interop cases, and the docs
table is generated from it."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from lycoris_interop import algorithm_cases

from lycolab.networks.registry import (
    AdapterOptions,
    UnknownAlgorithm,
    algorithm_of_module,
    algorithms,
    get_algorithm,
)

ROOT = Path(__file__).parent.parent
ALGORITHMS = list(algorithms().values())


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=[algorithm.name for algorithm in ALGORITHMS])
def test_each_algorithm_describes_itself_completely(algorithm):
    assert algorithm.module_class.algo == algorithm.name and algorithm.title and algorithm.markers
    options = algorithm.options_class
    assert issubclass(options, AdapterOptions) and dataclasses.is_dataclass(options)
    assert options.__dataclass_params__.frozen  # options are values: shared by every module of a network
    hints = typing.get_type_hints(options)
    assert all(hints[field.name] in (bool, int, float, str) for field in dataclasses.fields(options))
    assert all(get_algorithm(name) is algorithm for name in algorithm.names)
    assert get_algorithm(algorithm.name.upper()) is algorithm


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=[algorithm.name for algorithm in ALGORITHMS])
def test_each_algorithm_has_interop_cases(algorithm):
    # IA3's live in its own test file: lycoris-lora 4.1.3 cannot load any IA3 file (see tests/algorithm_cases)
    covered = {get_algorithm(case.algo).name for case in algorithm_cases()} | {"ia3"}
    assert algorithm.name in covered


def test_a_module_of_each_algorithm_is_told_apart_by_its_tensors():
    from lycolab.models.tiny import build_tiny_sd
    from lycolab.networks import create_network
    from lycolab.networks.io import group_by_module

    for case in algorithm_cases():
        sd = build_tiny_sd()
        network = create_network(sd.unet, [sd.text_encoder], algo=case.algo, dim=case.dim, alpha=case.alpha,
                                 conv_dim=case.conv_dim, conv_alpha=case.conv_alpha,
                                 network_module="lycoris.kohya", **case.options)
        for name, parameters in group_by_module(network.state_dict()).items():
            found = algorithm_of_module(parameters)
            assert found is not None and found.name == get_algorithm(case.algo).name, (case.id, name)
    assert algorithm_of_module({"mystery": torch.zeros(1)}) is None


def test_an_unknown_algo_lists_the_known_ones():
    with pytest.raises(UnknownAlgorithm, match="unknown algo 'lorax'; choose one of lora, locon, loha"):
        get_algorithm("lorax")


def test_the_algorithms_page_is_generated_from_the_registry():
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "algorithms_table.py"), "--check"],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
