"""Build the notebooks from their sources: ``notebooks/src/NN_name.py`` → ``notebooks/NN_name.ipynb``, and all of
them, in order, → ``notebooks/lycolab_all_in_one.ipynb``.

Sources are percent-format text (``# %% [markdown]``, ``# %% [parameters]`` for a Colab form, ``# %%`` for code) so
that changes review as plain diffs. Every notebook gets the "Open in Colab" badge for its own path in the repository
named in pyproject.toml. ``# %% [setup]`` becomes the three cells every notebook starts with, because each one may
be opened alone in a fresh runtime: the install-and-project form, the install cell (``lycolab/bootstrap.py``'s
source, which installs lycolab when it is missing or at another version) and ``open_workspace``. The all-in-one
notebook has them once, at the top, so it asks for the project once. Training notebooks ask Colab for a T4 GPU.
``--check`` exits 1 (listing the files) when a committed notebook differs from what the sources give — the test
suite runs it, so a stale notebook cannot be committed.

    python scripts/build_notebooks.py          # write
    python scripts/build_notebooks.py --check  # verify
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser under its old name
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "notebooks" / "src"
NOTEBOOKS = ROOT / "notebooks"
ALL_IN_ONE = "lycolab_all_in_one.ipynb"
CELL_MARKER = re.compile(r"^# %%(?: \[(markdown|parameters|setup)\])?\s*$")
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}
BOOTSTRAP = ROOT / "lycolab" / "bootstrap.py"
GPU_NOTEBOOKS = ("06_train.ipynb", "08_compare_epochs.ipynb", ALL_IN_ONE)  # 01–05 prepare on a CPU runtime
# Notebooks that are not steps of the training path (09: adapter tools) stay out of the all-in-one
NOT_STEPS = ("09_tools",)
SETUP_FORM = """#@title Install lycolab and open the project {{ display-mode: "form" }}
#@markdown `lycolab_source`: the lycolab release to run (this notebook's own by default), a branch such as `main`,
#@markdown or a `.whl` file or source folder on Drive. Each notebook installs it when missing, so any step can be
#@markdown opened alone or after a disconnect; when it is already there this takes a moment.
lycolab_source = "{version}"  #@param {{type:"string"}}
#@markdown The project is the folder that holds everything (in Colab `MyDrive/lycolab/<project>`). Empty = the last
#@markdown project used. Leave `workspace_root` empty for that default place.
project = ""  #@param {{type:"string"}}
workspace_root = ""  #@param {{type:"string"}}"""
OPEN_WORKSPACE = "from lycolab.colab import open_workspace\nws = open_workspace(project, workspace_root)"


def _project() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["project"]


def repository_url() -> str:
    return _project()["urls"]["Repository"].rstrip("/")


def bootstrap_cell() -> str:
    """The install cell: bootstrap.py's code (its docstring left out) with this build's version and repository,
    run in a namespace of its own so it leaves one name, ``_bootstrap``, in the notebook."""
    project = _project()
    source = BOOTSTRAP.read_text(encoding="utf-8")
    source = re.sub(r'^""".*?"""\n+', "", source, count=1, flags=re.DOTALL)
    source = re.sub(r'^BUILT_VERSION = "[^"]*"', f'BUILT_VERSION = "{project["version"]}"', source, flags=re.M)
    source = re.sub(r'^REPOSITORY = "[^"]*"', f'REPOSITORY = "{repository_url()}"', source, flags=re.M)
    if "'''" in source:
        raise SystemExit("lycolab/bootstrap.py must not contain triple single quotes (the cell quotes it with them)")
    return ("#@title Install lycolab when it is missing (the code is lycolab/bootstrap.py) { display-mode: \"form\" }\n"
            f"_bootstrap = {{}}\nexec(compile(r'''{source}''', \"lycolab/bootstrap.py\", \"exec\"), _bootstrap)\n"
            "_bootstrap[\"ensure\"](lycolab_source)")


def setup_cells() -> list[dict]:
    form = _cell("parameters", SETUP_FORM.format(version=_project()["version"]).split("\n"))
    return [form, _cell(None, bootstrap_cell().split("\n")), _cell(None, OPEN_WORKSPACE.split("\n"))]


def badge(notebook_name: str) -> str:
    path = repository_url().removeprefix("https://github.com/")
    url = f"https://colab.research.google.com/github/{path}/blob/main/notebooks/{notebook_name}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def _lines(text: str) -> list[str]:
    """nbformat's source list: every line keeps its newline except the last."""
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def _cell(kind: str | None, lines: list[str]) -> dict:
    text = "\n".join(lines).strip("\n")
    if kind == "markdown":
        text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.split("\n"))
        return {"cell_type": "markdown", "metadata": {}, "source": _lines(text)}
    metadata = {"cellView": "form", "tags": ["parameters"]} if kind == "parameters" else {}
    return {"cell_type": "code", "execution_count": None, "metadata": metadata, "outputs": [], "source": _lines(text)}


def parse_source(text: str) -> list[dict]:
    """The cells of a source; a ``# %% [setup]`` cell is returned as a placeholder that :func:`expand_setup` fills."""
    cells: list[dict] = []
    kind, lines, started = None, [], False
    for line in text.split("\n"):
        match = CELL_MARKER.match(line)
        if match:
            if started:
                cells.append({"setup": True} if kind == "setup" else _cell(kind, lines))
            kind, lines, started = match.group(1), [], True
        elif started:
            lines.append(line)
    if started:
        cells.append({"setup": True} if kind == "setup" else _cell(kind, lines))
    return cells


def expand_setup(cells: list[dict], keep: bool = True) -> list[dict]:
    """Replace the setup placeholder by the setup cells (or drop it: steps after the first in the all-in-one)."""
    expanded: list[dict] = []
    for cell in cells:
        expanded += (setup_cells() if keep else []) if cell.get("setup") else [cell]
    return expanded


def notebook(cells: list[dict], name: str) -> dict:
    first = cells[0]
    title, _, rest = "".join(first["source"]).partition("\n")
    first["source"] = _lines(f"{title}\n\n{badge(name)}\n" + (f"\n{rest.strip(chr(10))}" if rest.strip() else ""))
    metadata = {"colab": {"provenance": []}, "kernelspec": KERNEL, "language_info": {"name": "python"}}
    if name in GPU_NOTEBOOKS:  # what Colab's "Change runtime type → T4 GPU" writes
        metadata = {"accelerator": "GPU", "colab": {"gpuType": "T4", "provenance": []}, "kernelspec": KERNEL,
                    "language_info": {"name": "python"}}
    return {"cells": cells, "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}


def _with_ids(document: dict, prefix: str) -> dict:
    for index, cell in enumerate(document["cells"]):
        cell["id"] = f"{prefix}-{index:02d}"
    return document


def build() -> dict[Path, str]:
    """Every notebook's path and its JSON text."""
    built: dict[Path, str] = {}
    every_cell: list[dict] = []
    for index, source in enumerate(sorted(SOURCES.glob("[0-9][0-9]_*.py"))):
        cells = parse_source(source.read_text(encoding="utf-8"))
        name = f"{source.stem}.ipynb"
        built[NOTEBOOKS / name] = _dump(_with_ids(notebook(expand_setup(cells), name), source.stem[:2]))
        if source.stem in NOT_STEPS:
            continue
        # the all-in-one asks for the project once: only the first step keeps the setup cells
        step = _with_ids(notebook(expand_setup(parse_source(source.read_text(encoding="utf-8")), keep=index == 0),
                                  name), source.stem[:2])
        every_cell += json.loads(_dump(step))["cells"]
    intro = {"cell_type": "markdown", "metadata": {}, "source": _lines(
        "# lycolab · all steps in one notebook\n\nSteps 01–08 one after another (generated from the step notebooks by "
        "`scripts/build_notebooks.py`), asking for the project once at the top. Run it top to bottom on a GPU "
        "runtime, or open the step notebooks to re-run one step.")}
    intro["id"] = "all-00"
    combined = notebook([intro, *every_cell], ALL_IN_ONE)  # cells keep their step's ids ("05-03"): unique, traceable
    built[NOTEBOOKS / ALL_IN_ONE] = _dump(combined)
    return built


def _dump(document: dict) -> str:
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a notebook is out of date")
    args = parser.parse_args(argv)
    built = build()
    stale = [path for path, text in built.items()
             if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run python scripts/build_notebooks.py)")
        return 1 if stale else 0
    for path in stale:
        path.write_text(built[path], encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
