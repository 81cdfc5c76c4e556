"""Write the files-written-by-LyCORIS fixture set: one adapter per interop case, made by lycoris-lora itself.

For every ``[[case]]`` of ``tests/algorithm_cases/*.toml`` this builds the case's network with the reference
``lycoris-lora`` package on the tiny SD, gives it seeded random weights, saves it the way LyCORIS does
(``save_weights``, float16: small files) to ``tests/data/lycoris_files/<id>.safetensors`` and records the outputs
LyCORIS computes with that file applied (text-encoder states and U-Net output for fixed inputs) in
``<id>.expected.safetensors``.
``tests/test_lycoris_fixtures.py`` loads each file in lycolab and compares. Re-run after adding cases:

    .venv/bin/python scripts/lycoris_fixtures.py            # every case
    .venv/bin/python scripts/lycoris_fixtures.py boft-...   # only these ids
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from lycoris_interop import (  # noqa: E402
    algorithm_cases,
    model_outputs,
    randomize_network,
    reference_from_file,
    reference_network,
)

from lycolab.models.tiny import build_tiny_sd  # noqa: E402

FIXTURES = TESTS / "data" / "lycoris_files"


def write_fixture(case) -> Path:
    sd = build_tiny_sd()
    network = reference_network(sd, case)
    randomize_network(network, seed=11)
    path = FIXTURES / f"{case.id}.safetensors"
    network.save_weights(str(path), torch.float16, {"ss_network_module": "lycoris.kohya",
                                                    "lycolab_fixture": "written by lycoris-lora"})
    # The outputs as LyCORIS computes them from the saved file (what a user loading it in LyCORIS gets).
    fresh = build_tiny_sd()
    reloaded, _ = reference_from_file(path, fresh, preset=case.preset)
    reloaded.apply_to(fresh.text_encoder, fresh.unet, True, True)
    context, output = model_outputs(fresh)
    save_file({"text_encoder": context.contiguous(), "unet": output.contiguous()},
              str(FIXTURES / f"{case.id}.expected.safetensors"))
    return path


def main(ids: list[str]) -> None:
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for case in algorithm_cases():
        if ids and case.id not in ids or not case.fixture:
            continue
        path = write_fixture(case)
        print(f"{path.relative_to(TESTS.parent)}: {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main(sys.argv[1:])
