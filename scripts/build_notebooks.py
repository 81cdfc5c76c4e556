"""Build the notebooks from their sources: ``notebooks/src/NN_name.py`` → ``notebooks/NN_name.ipynb``, and all of
them, in order, → ``notebooks/lycolab_all_in_one.ipynb``.

Sources are percent-format text (``# %% [markdown]``, ``# %% [parameters]`` for a Colab form, ``# %%`` for code) so
that changes review as plain diffs. Every notebook gets the "Open in Colab" badge for its own path in the repository
named in pyproject.toml. ``--check`` exits 1 (listing the files) when a committed notebook differs from what the
sources give — the test suite runs it, so a stale notebook cannot be committed.

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
CELL_MARKER = re.compile(r"^# %%(?: \[(markdown|parameters)\])?\s*$")
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def repository_url() -> str:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["project"]["urls"]["Repository"].rstrip("/")


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
    cells: list[dict] = []
    kind, lines, started = None, [], False
    for line in text.split("\n"):
        match = CELL_MARKER.match(line)
        if match:
            if started:
                cells.append(_cell(kind, lines))
            kind, lines, started = match.group(1), [], True
        elif started:
            lines.append(line)
    if started:
        cells.append(_cell(kind, lines))
    return cells


def notebook(cells: list[dict], name: str) -> dict:
    first = cells[0]
    title, _, rest = "".join(first["source"]).partition("\n")
    first["source"] = _lines(f"{title}\n\n{badge(name)}\n" + (f"\n{rest.strip(chr(10))}" if rest.strip() else ""))
    return {"cells": cells, "metadata": {"colab": {"provenance": []}, "kernelspec": KERNEL,
                                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def _with_ids(document: dict, prefix: str) -> dict:
    for index, cell in enumerate(document["cells"]):
        cell["id"] = f"{prefix}-{index:02d}"
    return document


def build() -> dict[Path, str]:
    """Every notebook's path and its JSON text."""
    built: dict[Path, str] = {}
    every_cell: list[dict] = []
    for source in sorted(SOURCES.glob("[0-9][0-9]_*.py")):
        cells = parse_source(source.read_text(encoding="utf-8"))
        name = f"{source.stem}.ipynb"
        built[NOTEBOOKS / name] = _dump(_with_ids(notebook(cells, name), source.stem[:2]))
        every_cell += json.loads(built[NOTEBOOKS / name])["cells"]
    intro = {"cell_type": "markdown", "metadata": {}, "source": _lines(
        "# lycolab · all steps in one notebook\n\nSteps 01–08 one after another (generated from the step notebooks by "
        "`scripts/build_notebooks.py`). Run it top to bottom, or open the step notebooks to re-run one step.")}
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
