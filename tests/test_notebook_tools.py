"""Notebook 09 (adapter tools): only forms, calls into lycolab and displays; opened alone in a fresh Colab runtime
after a disconnect, it finds the project's adapters on Drive and writes the new files beside them."""

from __future__ import annotations

import nbformat
import pytest
import torch
from conftest import randomize_parameters
from test_notebooks import NOTEBOOKS, FreshRuntimes, _cell_kind, _text

from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import create_network

NOTEBOOK = NOTEBOOKS / "09_tools.ipynb"


def test_the_tools_notebook_holds_forms_calls_and_displays_only():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert "blob/main/notebooks/09_tools.ipynb" in notebook.cells[0].source
    imported: set[str] = set()
    kinds = [_cell_kind(cell, imported) for cell in notebook.cells if cell.cell_type == "code"]
    assert kinds[:3] == ["form", "bootstrap", "call"]
    assert kinds[3:] == ["form", "call", "display"] * 5, kinds  # inspect, resize, merge, extract, convert
    assert all(cell.outputs == [] for cell in notebook.cells if cell.cell_type == "code")


@pytest.fixture
def runtimes(tmp_path, monkeypatch):
    (tmp_path / "colab").mkdir()
    runtimes = FreshRuntimes(tmp_path / "colab", tmp_path / "no-upload")
    monkeypatch.setenv("JUPYTER_PATH", str(runtimes.root / "jupyter"))
    return runtimes


def test_the_tools_notebook_runs_alone_in_a_fresh_runtime_on_the_projects_output_folder(runtimes):
    output = runtimes.mounted() / "lycolab" / "tools" / "output"
    output.mkdir(parents=True)
    network = create_network(None, [build_tiny_sd().text_encoder], algo="lora", dim=4, alpha=2)
    randomize_parameters(network.parameters())
    network.save_weights(output / "tools.safetensors", dtype=torch.float32, metadata={"ss_num_epochs": "2"})
    executed = runtimes.run("09_tools", {"project": "tools", "new_rank": 2,
                                         "merge_adapters": "tools.safetensors:0.5, tools:0.5",
                                         "convert_to": "diffusers"})
    shown = _text(executed)
    assert "project tools:" in shown and "lycolab 0.1.0 installed" in shown
    assert "adapter tools.safetensors" in shown and "Epochs" in shown  # inspect
    assert "extract: skipped" in shown
    runtimes.mounted()
    written = sorted(path.name for path in output.glob("*.safetensors"))
    assert written == ["tools-diffusers.safetensors", "tools-r2.safetensors", "tools-tools-merged.safetensors",
                       "tools.safetensors"]
