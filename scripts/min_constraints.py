"""Write a pip constraints file that pins every dependency in pyproject.toml to its declared floor.

``make test-min`` installs lycolab under these constraints, so the floors in pyproject.toml are what is tested: a
floor that is too low fails the tests instead of failing a user. The file is generated, never kept by hand, so it
cannot drift from pyproject.toml. A dependency without a ``>=`` floor (or an ``==`` pin) is an error: every
requirement must say which oldest release it was checked against. ``--same-floors requirements-colab.txt`` fails
when a requirements file names one of these packages with another floor.

``--colab`` writes requirements-colab.txt instead: the constraints the notebooks' install cell passes to pip.
Every runtime dependency and the notebook extras (``notebook``, ``tensorboard``, ``gpu``) at pyproject's floor,
capped below the next major release where pyproject's ``[tool.lycolab.colab-ceilings]`` names one (majors of those
packages have broken callers before, and a Colab install must not pick up a break overnight); never torch, which
Colab ships matched to its CUDA. ``--check FILE`` fails when FILE is not what would be written.

    python scripts/min_constraints.py --exclude torch > constraints.txt
    python scripts/min_constraints.py --colab > requirements-colab.txt
    python scripts/min_constraints.py --colab --check requirements-colab.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NamedTuple

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# name, optional [extras], version specifiers, optional "; marker" (PEP 508 without URLs, which pyproject never uses).
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")
SPECIFIER = re.compile(r"^(~=|===|==|>=|<=|!=|<|>)\s*(\S+)$")


class FloorError(ValueError):
    """A requirement that names no floor to test, or a second list of requirements that disagrees."""


class Floor(NamedTuple):
    name: str
    version: str
    marker: str

    def constraint(self) -> str:
        return f"{self.name}=={self.version}" + (f" {self.marker}" if self.marker else "")


def normalized(name: str) -> str:
    """PEP 503 name, so ``tomli_w`` and ``tomli-w`` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> str:
    """``1.0.0`` → ``1``: trailing zeros do not make another release (PEP 440 pads with zeros)."""
    return re.sub(r"(\.0)+$", "", version)


def floor_of(requirement: str, source: str = "pyproject.toml") -> Floor:
    """``"numpy>=1.24"`` → Floor("numpy", "1.24", ""); an ``==`` pin is its own floor; the marker is kept."""
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise FloorError(f"{source}: cannot read the requirement {requirement!r}")
    name, _extras, specifiers, marker = match.groups()
    versions = {}
    for specifier in filter(None, (part.strip() for part in specifiers.split(","))):
        parsed = SPECIFIER.match(specifier)
        if parsed is None:
            raise FloorError(f"{source}: cannot read the version specifier {specifier!r} of {name}")
        versions[parsed.group(1)] = parsed.group(2)
    version = versions.get("==") or versions.get(">=")
    if version is None:
        raise FloorError(f"{source}: {requirement!r} has no floor; give it '>=' the oldest release that works")
    return Floor(name, version, (marker or "").strip())


def project_floors(pyproject: dict) -> list[Floor]:
    """Runtime dependencies first, then each extra's; self-references (``lycolab[test]``) and repeats left out."""
    project = pyproject["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    floors, seen = [], set()
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match and normalized(match.group(1)) == normalized(project["name"]):
            continue
        floor = floor_of(requirement)
        if floor in seen:
            continue
        seen.add(floor)
        floors.append(floor)
    return floors


def check_same_floors(floors: list[Floor], requirements_file: Path) -> None:
    """Every package both lists name must have the same floor, so Colab installs what test-min tested."""
    ours = {normalized(floor.name): floor.version for floor in floors}
    for line in requirements_file.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        theirs = floor_of(line, requirements_file.name)
        expected = ours.get(normalized(theirs.name))
        if expected is not None and release(expected) != release(theirs.version):
            raise FloorError(f"{requirements_file.name}: {theirs.name} has the floor {theirs.version} but "
                             f"pyproject.toml says {expected}; make them the same")


COLAB_EXTRAS = ("notebook", "tensorboard", "gpu")
COLAB_LEFT_OUT = ("torch", "torchvision", "torchaudio")


def colab_requirements(pyproject: dict) -> str:
    """requirements-colab.txt's text (see the module docstring)."""
    project = pyproject["project"]
    ceilings = {normalized(name): version for name, version in
                pyproject.get("tool", {}).get("lycolab", {}).get("colab-ceilings", {}).items()}
    requirements = list(project["dependencies"])
    for extra in COLAB_EXTRAS:
        requirements += project["optional-dependencies"][extra]
    lines = ["# Generated from pyproject.toml by `python scripts/min_constraints.py --colab` (the lint checks it): the",
             "# constraints every notebook's install cell gives pip. Floors are pyproject's (tested by make test-min),",
             "# ceilings the next major release of packages whose majors broke callers before. torch, torchvision",
             "# and torchaudio are never named: Colab ships them matched to its CUDA, and the install pins them."]
    seen = set()
    for requirement in requirements:
        floor = floor_of(requirement)
        key = normalized(floor.name)
        if key in seen or key in COLAB_LEFT_OUT:
            continue
        seen.add(key)
        ceiling = f",<{ceilings[key]}" if key in ceilings else ""
        lines.append(f"{floor.name}>={floor.version}{ceiling}" + (f"; {floor.marker.lstrip('; ')}" if floor.marker
                                                                  else ""))
    unknown = set(ceilings) - seen
    if unknown:
        raise FloorError(f"pyproject.toml: colab-ceilings names {', '.join(sorted(unknown))}, which is not a "
                         "dependency")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    parser.add_argument("--exclude", action="append", default=[],
                        help="a package to leave unpinned (installed separately, e.g. torch); may repeat")
    parser.add_argument("--same-floors", action="append", default=[], type=Path, metavar="REQUIREMENTS_TXT",
                        help="fail unless this requirements file gives the same floors; may repeat")
    parser.add_argument("--colab", action="store_true", help="write requirements-colab.txt's text instead")
    parser.add_argument("--check", type=Path, metavar="FILE", help="with --colab: fail unless FILE holds that text")
    args = parser.parse_args(argv)
    try:
        pyproject = tomllib.loads(args.pyproject.read_text(encoding="utf-8"))
        floors = project_floors(pyproject)
        for requirements_file in args.same_floors:
            check_same_floors(floors, requirements_file)
        colab = colab_requirements(pyproject) if args.colab else None
    except FloorError as error:
        print(error, file=sys.stderr)
        return 1
    if colab is not None:
        if args.check is None:
            print(colab, end="")
            return 0
        if not args.check.is_file() or args.check.read_text(encoding="utf-8") != colab:
            print(f"{args.check}: out of date; run python scripts/min_constraints.py --colab > {args.check.name}",
                  file=sys.stderr)
            return 1
        return 0
    excluded = {normalized(name) for name in args.exclude}
    print(f"# Generated from {args.pyproject.name} by scripts/min_constraints.py: every dependency at its floor.")
    print("\n".join(floor.constraint() for floor in floors if normalized(floor.name) not in excluded))
    return 0


if __name__ == "__main__":
    sys.exit(main())
