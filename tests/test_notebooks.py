"""The notebooks: built from their sources, carrying no logic or secrets, and run end to end on the tiny model."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
import tomllib
from conftest import make_shapes_dataset
from IPython.core.inputtransformer2 import TransformerManager
from safetensors import safe_open
from test_annotate import build_tagger

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
STEPS = ["01_install", "02_download_model", "03_get_data", "04_annotate", "05_configure", "06_train",
         "07_save_to_drive", "08_compare_epochs"]
ALL_NOTEBOOKS = [NOTEBOOKS / f"{name}.ipynb" for name in STEPS] + [NOTEBOOKS / "lycolab_all_in_one.ipynb"]
PARAM_LINE = re.compile(r"^(\s*)(\w+)\s*=\s*(.+?)(\s*#@param.*)$")
TOKEN_PATTERNS = (re.compile(r"hf_[A-Za-z0-9]{20,}"), re.compile(r"\b[0-9a-f]{32}\b"), re.compile(r"(?i)token\s*="))


def test_the_notebooks_are_built_from_their_sources():
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_notebooks.py"), "--check"],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def _cell_kind(cell, imported: set[str]) -> str:
    """form / call / display / install, or a message saying what is not allowed."""
    code = TransformerManager().transform_cell("".join(cell.source))
    tree = ast.parse(code)
    if "parameters" in cell.metadata.get("tags", []):
        literal = all(isinstance(node, ast.Assign) and _is_literal(node.value) for node in tree.body)
        return "form" if literal and "#@title" in code else "a form cell holds only #@title and literal #@params"
    forbidden = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.For, ast.While,
                 ast.ListComp, ast.DictComp, ast.SetComp, ast.GeneratorExp, ast.With, ast.Try)
    if any(isinstance(node, forbidden) for node in ast.walk(tree)):
        return "no definitions, loops or comprehensions in a notebook"
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.If):
        magics = all(isinstance(node, ast.Expr) and "get_ipython" in ast.unparse(node) for node in tree.body[0].body)
        return "install" if magics else "an if-cell may only hold %pip lines"
    calls = 0
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lycolab"):
            imported.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.Expr)) and isinstance(node.value, ast.Call):
            root = node.value.func
            while isinstance(root, ast.Attribute):
                root = root.value
            if not (isinstance(root, ast.Name) and root.id in imported):
                return f"calls must go into lycolab: {ast.unparse(node)[:60]}"
            calls += 1
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, (ast.Name, ast.Attribute))):
            return f"not a form, a call into lycolab or a display: {ast.unparse(node)[:60]}"
    return "call" if calls == 1 else "display" if calls == 0 else "one call into lycolab per cell"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_cells_are_forms_calls_or_displays_with_no_outputs_or_tokens(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and "colab.research.google.com/github/lycolab/lycolab/blob/main/notebooks/" \
        f"{path.name}" in first.source
    imported: set[str] = set()
    kinds = []
    for cell in notebook.cells:
        text = "".join(cell.source)
        assert not any(pattern.search(text) for pattern in TOKEN_PATTERNS), f"token-like text in {path.name}"
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [] and cell.execution_count is None, f"saved output in {path.name}"
        kind = _cell_kind(cell, imported)
        assert kind in ("form", "call", "display", "install"), f"{path.name}: {kind}\n{text}"
        kinds.append(kind)
    assert "install" not in kinds or path.stem in ("01_install", "lycolab_all_in_one")
    if path.stem != "01_install" and path.stem != "lycolab_all_in_one":
        assert kinds[:2] == ["form", "call"], "the first code cells reopen the workspace"
        assert "open_workspace" in "".join(notebook.cells[2].source)


def inject(path: Path, values: dict[str, object], per_step: dict[str, dict[str, object]] | None = None
           ) -> nbformat.NotebookNode:
    """The notebook with form values replaced, as papermill would inject them; ``per_step`` adds values for the
    cells of one step only (by the "NN-" id prefix the all-in-one notebook keeps)."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if "parameters" not in cell.metadata.get("tags", []):
            continue
        cell_values = {**values, **(per_step or {}).get(cell.id[:2], {})}
        lines = []
        for line in "".join(cell.source).split("\n"):
            match = PARAM_LINE.match(line)
            if match and match.group(2) in cell_values:
                line = f"{match.group(1)}{match.group(2)} = {cell_values[match.group(2)]!r}{match.group(4)}"
            lines.append(line)
        cell.source = "\n".join(lines)
    return notebook


def execute(path: Path, values: dict[str, object], cwd: Path, per_step: dict[str, dict[str, object]] | None = None
            ) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    notebook = inject(path, values, per_step)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def _outputs(notebook, mime: str) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
            if mime in output.get("data", {})]


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """A zip of 4 captioned images, a tiny WD14 tagger and each step's form values for the tiny model."""
    root = tmp_path_factory.mktemp("notebook-inputs")
    make_shapes_dataset(root / "source")
    archive = root / "images.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for image in sorted((root / "source" / "2_shapes").glob("*.png")):
            bundle.write(image, f"2_shapes/{image.name}")
    tagger = build_tagger(root / "tagger")
    return {
        "01": {"install_packages": False},
        "02": {"base_model": str(tiny_model_dir), "vae_model": ""},
        "03": {"source": "zip", "location": str(archive), "resolution": 64},
        "04": {"method": "wd14", "annotation_model": str(tagger), "undesired_tags": "tag_b", "trigger_word": "sks",
               "images_to_show": 2},
        "05": {"resolution": 64, "dataset_repeats": 1, "network_category": "LoHa", "network_dim": 4,
               "network_alpha": 2, "conv_dim": 2, "conv_alpha": 1, "optimizer_type": "AdamW", "unet_lr": 1e-3,
               "num_epochs": 2, "train_batch_size": 2, "mixed_precision": "no", "save_precision": "float",
               "xformers": False, "max_token_length": 75, "seed": 1,
               "sample_prompts": "sks, red circle --w 64 --h 64 --s 2"},
        "07": {"destination": str(root / "drive")},
        "08": {"prompts": "sks, red circle --w 64 --h 64", "steps": 2},
    }


def assert_every_step_left_its_files(ws: Path, drive: Path) -> None:
    choices = json.loads((ws / "config" / "workspace.json").read_text())
    assert Path(choices["model"]).is_dir() and choices["caption_extension"] == ".txt"  # 02 and 04
    images = sorted((ws / "train_data" / "2_shapes").glob("*.png"))
    assert len(images) == 4  # 03
    assert all(image.with_suffix(".txt").read_text().startswith("sks, ") for image in images)  # 04
    assert not any("tag_b" in image.with_suffix(".txt").read_text() for image in images)
    for file_name in ("config_file.toml", "dataset_config.toml", "sample_prompt.txt"):  # 05
        assert (ws / "config" / file_name).is_file()
    output = ws / "output"
    assert (output / f"{ws.name}.safetensors").is_file() and (output / f"{ws.name}-000001.safetensors").is_file()
    assert (output / f"{ws.name}-state").is_dir() and (ws / "logs" / "loss.csv").is_file()  # 06
    assert list((ws / "output" / "sample").glob("*_grid.png"))
    assert len(list(drive.glob("*.zip"))) == 3  # 07: output, config, logs
    assert list((ws / "output" / "compare").glob("*.png"))  # 08


@pytest.fixture(scope="module")
def project(inputs, tmp_path_factory):
    """Every step notebook run in order, each in a fresh kernel; returns (root, workspace, executed notebooks)."""
    root = tmp_path_factory.mktemp("notebooks")
    workspace = {"project": "nbtest", "workspace_root": str(root / "ws")}
    executed = {name: execute(NOTEBOOKS / f"{name}.ipynb", {**workspace, **inputs.get(name[:2], {})}, root)
                for name in STEPS}
    return root, root / "ws" / "nbtest", executed


def test_every_step_notebook_runs_in_order_and_leaves_its_files(project, inputs):
    root, ws, executed = project
    assert_every_step_left_its_files(ws, Path(inputs["07"]["destination"]))
    assert _outputs(executed["06_train"], "image/png"), "the live loss plot is shown"
    assert _outputs(executed["05_configure"], "text/html"), "the plan is shown as a table"
    assert _outputs(executed["08_compare_epochs"], "text/html")


def test_the_all_in_one_notebook_runs_top_to_bottom(inputs, tmp_path):
    drive = tmp_path / "drive"
    per_step = {**inputs, "07": {"destination": str(drive)}}
    executed = execute(NOTEBOOKS / "lycolab_all_in_one.ipynb", {"project": "allinone",
                                                                "workspace_root": str(tmp_path / "ws")},
                       tmp_path, per_step)
    assert_every_step_left_its_files(tmp_path / "ws" / "allinone", drive)
    assert _outputs(executed, "image/png")


def test_the_training_step_reruns_alone_in_a_fresh_kernel_with_another_learning_rate(project):
    root, ws, _ = project
    executed = execute(NOTEBOOKS / "06_train.ipynb", {"project": "nbtest", "workspace_root": str(root / "ws"),
                                                       "unet_lr": "0.0005"}, root)
    with safe_open(str(ws / "output" / "nbtest.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_unet_lr"] == "0.0005" and metadata["ss_steps"] == "8"  # 2_shapes: 4 images × 2, batch 2
    assert _outputs(executed, "image/png")


def test_a_bad_value_fails_the_cell_in_one_line(project):
    from nbclient.exceptions import CellExecutionError

    root, _, _ = project
    with pytest.raises(CellExecutionError) as caught:
        execute(NOTEBOOKS / "06_train.ipynb", {"project": "nbtest", "workspace_root": str(root / "ws"),
                                               "unet_lr": "fast"}, root)
    assert "unet_lr must be a number like 1e-4" in str(caught.value)
    assert "Traceback" not in str(caught.value).split("unet_lr must be")[0][-300:]


def test_the_colab_requirements_hold_every_runtime_dependency_but_never_torch():
    """01 installs requirements-colab.txt and then lycolab with --no-deps, so that file must be complete."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    needed = {name.match(item).group(0).lower() for item in dependencies if "python_version" not in item}
    lines = [line.strip() for line in (ROOT / "requirements-colab.txt").read_text().splitlines()]
    listed = {name.match(line).group(0).lower() for line in lines if line and not line.startswith("#")}
    assert needed - {"torch"} <= listed, needed - listed
    assert not listed & {"torch", "torchvision", "torchaudio"}
