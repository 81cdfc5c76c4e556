"""The notebooks: built from their sources, carrying no logic or secrets, and run end to end on the tiny model.

Each step notebook runs as a Colab user meets it: alone, in a fresh runtime where lycolab is not installed (a venv
of its own that sees the test environment's packages but not lycolab), with ``google.colab`` faked
(tests/fake_colab) so Drive, Secrets and uploads take their Colab paths. The first cell installs lycolab from a
source folder on the fake Drive, as the form's "folder" source would.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
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
FAKE_COLAB = Path(__file__).resolve().parent / "fake_colab"
FAKE_HF_TOKEN = "hf_fakeTokenThatMustNeverBeShown0123"
sys.path.insert(0, str(ROOT / "scripts"))
from build_notebooks import bootstrap_cell  # noqa: E402


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
    """form / bootstrap / call / display / magics, or a message saying what is not allowed."""
    if "".join(cell.source) == bootstrap_cell():
        return "bootstrap"  # lycolab/bootstrap.py's own code, copied by the build (checked stale above)
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
        return "magics" if magics else "an if-cell may only hold %magic lines"
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
        assert kind in ("form", "bootstrap", "call", "display", "magics"), f"{path.name}: {kind}\n{text}"
        kinds.append(kind)
    assert kinds[:3] == ["form", "bootstrap", "call"], "the first code cells install lycolab and open the workspace"
    code = ["".join(cell.source) for cell in notebook.cells if cell.cell_type == "code"]
    assert "lycolab_source" in code[0] and "open_workspace" in code[2]
    assert kinds.count("bootstrap") == 1, "one install cell, and the all-in-one asks for the project once"


def test_training_notebooks_ask_colab_for_a_gpu_and_preparing_ones_do_not():
    for path in ALL_NOTEBOOKS:
        metadata = nbformat.read(path, as_version=4).metadata
        wants_gpu = path.stem in ("06_train", "08_compare_epochs", "lycolab_all_in_one")
        assert (metadata.get("accelerator") == "GPU") == wants_gpu, path.name
        assert (metadata.colab.get("gpuType") == "T4") == wants_gpu, path.name


def test_the_install_cell_is_bootstrap_py_at_the_version_the_notebooks_were_built_from():
    with (ROOT / "pyproject.toml").open("rb") as handle:
        version = tomllib.load(handle)["project"]["version"]
    form = "".join(nbformat.read(NOTEBOOKS / "06_train.ipynb", as_version=4).cells[1].source)
    assert f'lycolab_source = "{version}"' in form
    assert f'BUILT_VERSION = "{version}"' in bootstrap_cell()
    source = (ROOT / "lycolab" / "bootstrap.py").read_text(encoding="utf-8")
    assert source.split('"""', 2)[2].strip().split("\n")[-1] in bootstrap_cell()  # its code, to the last line


def inject(path: Path, values: dict[str, object], per_step: dict[str, dict[str, object]] | None = None
           ) -> nbformat.NotebookNode:
    """The notebook with form values replaced, as papermill would inject them; ``per_step`` adds values for the
    cells of one step only (by the "NN-" id prefix the all-in-one notebook keeps)."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if "parameters" not in cell.metadata.get("tags", []):
            continue
        cell_values = {**values, **(per_step or {}).get(cell.id[:2], {})}
        lines, replaced = [], set()
        for line in "".join(cell.source).split("\n"):
            match = PARAM_LINE.match(line)
            if match and match.group(2) in cell_values:
                line = f"{match.group(1)}{match.group(2)} = {cell_values[match.group(2)]!r}{match.group(4)}"
                replaced.add(match.group(2))
            lines.append(line)
        assigned = {target.id for node in ast.parse("\n".join(lines)).body if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}
        lines += [f"{name} = {cell_values[name]!r}" for name in sorted(assigned - replaced) if name in cell_values]
        cell.source = "\n".join(lines)
    return notebook


def execute(path: Path, values: dict[str, object], cwd: Path, per_step: dict[str, dict[str, object]] | None = None,
            kernel_name: str = "python3") -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    notebook = inject(path, values, per_step)
    NotebookClient(notebook, timeout=600, kernel_name=kernel_name, resources={"metadata": {"path": str(cwd)}}
                   ).execute()
    return notebook


def _outputs(notebook, mime: str) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
            if mime in output.get("data", {})]


def _text(notebook) -> str:
    """Everything the notebook showed: streams, errors and every text-like rendering of its results."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") + "".join(output.get("traceback", [])))
            parts += [str(value) for mime, value in output.get("data", {}).items() if mime.startswith("text/")]
    return "\n".join(parts)


class FreshRuntimes:
    """Colab-like runtimes: each a new venv where lycolab is not installed, with its own Jupyter kernel.

    A venv sees the test environment's packages (but not lycolab) through a folder of links, so installing lycolab
    there resolves its dependencies without downloading them; ``google.colab`` is tests/fake_colab, Drive is mounted
    under ``drive``, ``HF_TOKEN`` is a secret and ``files.upload()`` picks ``upload``.
    """

    def __init__(self, root: Path, upload: Path):
        import sysconfig

        self.root, self.count = root, 0
        self.packages = root / "packages"
        self.packages.mkdir()
        for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
            if not entry.name.lower().startswith(("lycolab", "__editable__", "_lycolab")) and entry.suffix != ".pth":
                (self.packages / entry.name).symlink_to(entry)
        self.drive = root / "content" / "drive"
        self.source = self.drive / "MyDrive" / "lycolab-src"  # a lycolab source folder a user put on Drive
        for name in ("lycolab", "pyproject.toml", "README.md", "requirements-colab.txt"):
            copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
            copy(ROOT / name, self.source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                    if (ROOT / name).is_dir() else {}))
        self.store = root / "drive-unmounted"
        self.env = {"HF_HUB_OFFLINE": "1", "LYCOLAB_DRIVE_MOUNT": str(self.drive), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                    "FAKE_COLAB_SECRETS": json.dumps({"HF_TOKEN": FAKE_HF_TOKEN}), "FAKE_COLAB_UPLOAD": str(upload),
                    "FAKE_COLAB_LOG": str(root / "colab.log"), "FAKE_COLAB_DRIVE_STORE": str(self.store)}

    def mounted(self) -> Path:
        """MyDrive, mounted as a runtime leaves it (for a test to look at or change files on Drive)."""
        if self.store.is_dir():
            self.store.rename(self.drive / "MyDrive")
        return self.drive / "MyDrive"

    def new(self) -> str:
        """A new runtime, whose Drive is not mounted yet; returns its kernel's name."""
        self.mounted().rename(self.store)
        self.count += 1
        venv = self.root / f"runtime{self.count}"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        (site / "_runtime.pth").write_text(f"{self.packages}\n{FAKE_COLAB}\n", encoding="utf-8")
        spec = self.root / "jupyter" / "kernels" / f"runtime{self.count}"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"fresh runtime {self.count}", "language": "python", "env": self.env}), encoding="utf-8")
        return f"runtime{self.count}"

    def run(self, name: str, values: dict[str, object]) -> nbformat.NotebookNode:
        """The step notebook ``name`` alone in a new runtime, lycolab installed by its first cell from Drive."""
        return execute(NOTEBOOKS / f"{name}.ipynb", {"lycolab_source": str(self.source), **values}, self.root,
                       kernel_name=self.new())


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
        "archive": archive,
        "02": {"base_model": str(tiny_model_dir), "vae_model": ""},
        "03": {"source": "zip", "location": str(archive), "resolution": 64},
        "04": {"method": "wd14", "annotation_model": str(tagger), "undesired_tags": "tag_b", "trigger_word": "sks",
               "images_to_show": 2},
        "05": {"resolution": 64, "dataset_repeats": 1, "network_category": "LoHa", "network_dim": 4,
               "network_alpha": 2, "conv_dim": 2, "conv_alpha": 1, "optimizer_type": "AdamW", "unet_lr": 1e-3,
               "num_epochs": 2, "train_batch_size": 2, "mixed_precision": "no", "save_precision": "float",
               "xformers": False, "max_token_length": 75, "seed": 1, "min_bucket_reso": 64,
               "sample_prompts": "sks, red circle --w 64 --h 64 --s 2",
               "sample_prompt_lines": "sks, blue square --w 64 --h 64 --s 2\n"},
        "07": {"destination": str(root / "drive")},
        "08": {"prompts": "sks, red circle --w 64 --h 64", "steps": 2},
    }


def assert_every_step_left_its_files(ws: Path, backups: Path | None) -> None:
    """``backups``: where 07 zipped the folders to; None when the workspace is on Drive (07 stores nothing twice)."""
    choices = json.loads((ws / "config" / "workspace.json").read_text())
    assert Path(choices["model"]).is_dir() and choices["caption_extension"] == ".txt"  # 02 and 04
    images = sorted((ws / "train_data" / "2_shapes").glob("*.png"))
    assert len(images) == 4  # 03
    assert all(image.with_suffix(".txt").read_text().startswith("sks, ") for image in images)  # 04
    assert not any("tag_b" in image.with_suffix(".txt").read_text() for image in images)
    for file_name in ("config_file.toml", "dataset_config.toml", "sample_prompt.txt"):  # 05
        assert (ws / "config" / file_name).is_file()
    assert (ws / "config" / "sample_prompt.txt").read_text().splitlines() == [
        "sks, red circle --w 64 --h 64 --s 2", "sks, blue square --w 64 --h 64 --s 2"]
    output = ws / "output"
    assert (output / f"{ws.name}.safetensors").is_file() and (output / f"{ws.name}-000001.safetensors").is_file()
    assert (output / f"{ws.name}-state").is_dir() and (ws / "logs" / "loss.csv").is_file()  # 06
    assert list((ws / "output" / "sample").glob("*_grid.png"))
    if backups is not None:
        assert len(list(backups.glob("*.zip"))) == 3  # 07: output, config, logs
    assert list((ws / "output" / "compare").glob("*.png"))  # 08


@pytest.fixture(scope="module")
def runtimes(inputs, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        runtimes = FreshRuntimes(tmp_path_factory.mktemp("colab"), inputs["archive"])
        patch.setenv("JUPYTER_PATH", str(runtimes.root / "jupyter"))
        yield runtimes


@pytest.fixture(scope="module")
def project(inputs, runtimes):
    """Every step notebook run in order as a Colab user would, each alone in a fresh runtime. 01 names the project;
    the later ones leave it empty and get the last one used. Returns (workspace, executed notebooks, Drive mounts
    they made)."""
    values = {**inputs, "01": {"project": "nbtest"}, "03": {**inputs["03"], "source": "upload", "location": ""},
              "07": {"destination": ""}}
    executed = {name: runtimes.run(name, values.get(name[:2], {})) for name in STEPS}
    mounts = (runtimes.root / "colab.log").read_text().count("mount ")
    return runtimes.mounted() / "lycolab" / "nbtest", executed, mounts


def test_every_step_notebook_runs_alone_in_a_fresh_colab_runtime_and_leaves_its_files(project):
    ws, executed, mounts = project
    assert_every_step_left_its_files(ws, backups=None)
    for name, notebook in executed.items():
        shown = _text(notebook)
        assert "installing lycolab from" in shown and "lycolab 0.1.0 installed" in shown, name
        assert "project nbtest:" in shown, f"{name} opened the last project used"
        assert FAKE_HF_TOKEN not in shown, f"the HF token was shown by {name}"
    assert _outputs(executed["06_train"], "image/png"), "the live loss plot is shown"
    assert _outputs(executed["05_configure"], "text/html"), "the plan is shown as a table"
    assert _outputs(executed["08_compare_epochs"], "text/html")
    assert "already on Drive" in _text(executed["07_save_to_drive"])
    assert mounts == len(STEPS), "each new runtime mounts Drive once"


def test_the_training_notebook_shows_lycolabs_log_lines(project):
    _, executed, _ = project
    shown = _text(executed["06_train"])
    assert "number of images (including repeats)" in shown and "bucket" in shown  # the bucket report
    assert "no unfinished run of nbtest to resume" in shown, shown[-6000:]


def test_the_all_in_one_notebook_runs_top_to_bottom(inputs, tmp_path):
    drive = tmp_path / "drive"
    per_step = {**inputs, "07": {"destination": str(drive)}}
    executed = execute(NOTEBOOKS / "lycolab_all_in_one.ipynb", {"project": "allinone",
                                                                "workspace_root": str(tmp_path / "ws")},
                       tmp_path, per_step)
    assert_every_step_left_its_files(tmp_path / "ws" / "allinone", drive)
    assert _outputs(executed, "image/png")
    assert "installing lycolab" not in _text(executed), "lycolab was in place: nothing is installed"


def test_after_a_disconnect_a_fresh_runtime_offers_the_saved_state_and_a_finished_run_starts_anew(project,
                                                                                                  runtimes):
    ws, _, _ = project
    runtimes.mounted()
    final, final_state = ws / "output" / "nbtest.safetensors", ws / "output" / "nbtest-state"
    final.unlink()  # the runtime went away after epoch 1 was saved: no final file or state yet
    shutil.rmtree(final_state)
    resumed = runtimes.run("06_train", {})
    assert "found nbtest-000001-state from a run that did not finish: resuming" in _text(resumed)
    runtimes.mounted()
    with safe_open(str(final), "pt") as handle:
        assert handle.metadata()["ss_steps"] == "8"
    again = runtimes.run("06_train", {"unet_lr": "0.0005"})  # the newest state is a finished run's: a new run
    assert "resuming" not in _text(again)
    runtimes.mounted()
    with safe_open(str(final), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_unet_lr"] == "0.0005" and metadata["ss_steps"] == "8"  # 2_shapes: 4 images × 2, batch 2
    assert _outputs(again, "image/png")


def test_a_bad_value_fails_the_cell_in_one_line(project, runtimes, tmp_path):
    from nbclient.exceptions import CellExecutionError

    ws, _, _ = project
    runtimes.mounted()
    with pytest.raises(CellExecutionError) as caught:
        execute(NOTEBOOKS / "06_train.ipynb", {"project": "nbtest", "workspace_root": str(ws.parent),
                                               "unet_lr": "fast"}, tmp_path)
    assert "unet_lr must be a number like 1e-4" in str(caught.value)
    assert "Traceback" not in str(caught.value).split("unet_lr must be")[0][-300:]


def test_the_colab_requirements_are_generated_from_pyproject_and_never_name_torch():
    """The install cell passes requirements-colab.txt to pip as constraints: floors and ceilings from pyproject."""
    completed = subprocess.run([sys.executable, str(ROOT / "scripts" / "min_constraints.py"), "--colab",
                                "--check", str(ROOT / "requirements-colab.txt")], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    lines = [line.strip() for line in (ROOT / "requirements-colab.txt").read_text().splitlines()]
    listed = {name.match(line).group(0).lower() for line in lines if line and not line.startswith("#")}
    with (ROOT / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)["project"]
    needed = {name.match(item).group(0).lower() for item in project["dependencies"] if "python_version" not in item}
    assert needed - {"torch"} <= listed and "bitsandbytes" in listed, needed - listed
    assert not listed & {"torch", "torchvision", "torchaudio"}
    assert "transformers>=5.0,<6" in lines
