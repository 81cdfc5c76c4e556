"""Write the algorithm table of docs/algorithms.md from the registry (lycolab.networks.registry): every algorithm's
``algo`` names, the file keys that identify it, its options with their defaults and its notebook category.

The table sits between two marker lines in the page, so the prose around it is kept. ``--check`` exits 1 when the
committed page differs (the tests run it), so the page cannot fall behind the code.

    python scripts/algorithms_table.py          # write
    python scripts/algorithms_table.py --check  # verify
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "algorithms.md"
BEGIN, END = "<!-- algorithms table: begin (scripts/algorithms_table.py) -->", "<!-- algorithms table: end -->"
sys.path.insert(0, str(ROOT))


def _options(options_class) -> str:
    from lycolab.networks.registry import AdapterOptions

    shared = {field.name for field in dataclasses.fields(AdapterOptions)}
    own = [field for field in dataclasses.fields(options_class) if field.name not in shared]
    return ", ".join(f"`{field.name}={field.default}`" for field in own) or "—"


def table() -> str:
    from lycolab.networks.registry import algorithms

    rows = ["| algo | what | keys in a file | options (default) | notebook category |", "|---|---|---|---|---|"]
    for algorithm in algorithms().values():
        names = " / ".join(f"`{name}`" for name in algorithm.names)
        markers = ", ".join(f"`{marker}`" for marker in algorithm.markers)
        category = algorithm.category or "— (network_args)"
        rows.append(f"| {names} | {algorithm.title} | {markers} | {_options(algorithm.options_class)} | {category} |")
    return "\n".join(rows)


def page(current: str) -> str:
    before, _, rest = current.partition(BEGIN)
    _, _, after = rest.partition(END)
    return f"{before}{BEGIN}\n{table()}\n{END}{after}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/algorithms.md is out of date")
    args = parser.parse_args()
    current = PAGE.read_text(encoding="utf-8")
    if BEGIN not in current or END not in current:
        print(f"{PAGE}: the marker lines are missing", file=sys.stderr)
        return 1
    wanted = page(current)
    if args.check:
        if wanted != current:
            print(f"{PAGE} is out of date: run python scripts/algorithms_table.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
