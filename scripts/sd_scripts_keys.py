"""Extract the option names sd-scripts' ``train_network.py`` and ``sdxl_train_network.py`` accept, and its
dataset_config schema keys, into
``tests/data/sd_scripts_keys.toml``: the list lycolab's parity test and parity table walk.

The names are read from sd-scripts' source as data (Python's ``ast``; nothing of it is imported or run):
``train_network.setup_parser``, ``sdxl_train_network.setup_parser`` and every ``add_*_arguments(parser, …)``
function they call, each ``--name`` given to
``parser.add_argument``; and the dict literals ``*_SCHEMA = {…}`` of ``ConfigSanitizer`` in
``library/config_util.py`` for the dataset file. Conditional arguments are all taken (a superset is safe: a key we
list and sd-scripts does not offer is just refused or implemented needlessly).

    python scripts/sd_scripts_keys.py --git-dir /work/.mirror/kohya-ss+sd-scripts/repo > tests/data/sd_scripts_keys.toml
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys

MODULES = {"train_util": "library/train_util.py", "config_util": "library/config_util.py",
           "custom_train_functions": "library/custom_train_functions.py",
           "deepspeed_utils": "library/deepspeed_utils.py", "sai_model_spec": "library/sai_model_spec.py",
           "sdxl_train_util": "library/sdxl_train_util.py"}
# lycolab trains SD 1.x/2.x and SDXL with one command, so it takes the options of both scripts
ENTRIES = (("train_network.py", "setup_parser"), ("sdxl_train_network.py", "setup_parser"))


def _source(git_dir: str, commit: str, path: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{commit}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def _option_names(function: ast.FunctionDef) -> list[tuple[str, object]]:
    """(name, default) of each option; the default is None unless it is a literal (store_true gives False)."""
    names = []
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            default = None
            if "default" in keywords:
                try:
                    default = ast.literal_eval(keywords["default"])
                except ValueError:
                    default = None
            elif isinstance(keywords.get("action"), ast.Constant) and keywords["action"].value == "store_true":
                default = False
            names += [(arg.value[2:], default) for arg in node.args
                      if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--")]
    return names


def _called(function: ast.FunctionDef) -> list[tuple[str | None, str]]:
    """(module alias or None, function name) of each ``add_*_arguments`` call in ``function``."""
    calls = []
    for node in ast.walk(function):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            calls.append((node.func.value.id, node.func.attr))
        elif isinstance(node.func, ast.Name):
            calls.append((None, node.func.id))
    return [(module, name) for module, name in calls if name.startswith("add_") and name.endswith("_arguments")]


def config_file_keys(git_dir: str, commit: str) -> list[tuple[str, object]]:
    trees = {alias: ast.parse(_source(git_dir, commit, path)) for alias, path in MODULES.items()}
    keys: list[tuple[str, object]] = []
    for script, function_name in ENTRIES:
        local = _functions(ast.parse(_source(git_dir, commit, script)))
        keys += [key for key in _entry_keys(trees, local, function_name) if key[0] not in {name for name, _ in keys}]
    return keys


def _entry_keys(trees: dict[str, ast.Module], local: dict[str, ast.FunctionDef], entry: str
                ) -> list[tuple[str, object]]:
    keys: list[tuple[str, object]] = []
    pending = [(None, entry)]
    seen = set()
    while pending:
        module, name = pending.pop(0)
        if (module, name) in seen:
            continue
        seen.add((module, name))
        function = _functions(trees[module]).get(name) if module in trees else local.get(name)
        if function is None:  # e.g. the logging helpers: not training options
            continue
        known = {name for name, _ in keys}
        keys += [(name, default) for name, default in _option_names(function) if name not in known]
        pending += [(called_module or module, called) for called_module, called in _called(function)]
    return keys


def dataset_keys(git_dir: str, commit: str) -> dict[str, list[str]]:
    """Schema dict keys by where they may stand: subset keys, dataset keys, and [general] (both)."""
    tree = ast.parse(_source(git_dir, commit, MODULES["config_util"]))
    schemas: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name) and node.targets[0].id.endswith("_SCHEMA"):
            schemas[node.targets[0].id] = [name for name in map(_schema_key, node.value.keys) if name]
    subset = sorted({key for name, keys in schemas.items() if "SUBSET" in name for key in keys})
    dataset = sorted(set(schemas.get("DATASET_ASCENDABLE_SCHEMA", [])))
    return {"subset": subset, "dataset": dataset}


def _schema_key(key: ast.expr | None) -> str | None:
    """``"name"`` or voluptuous' ``Required("name")``."""
    if isinstance(key, ast.Call) and key.args:
        key = key.args[0]
    return key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else None


def _toml_value(value: object) -> str:
    import json

    return ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)


def _toml_list(name: str, items: list[str]) -> str:
    lines = [f"{name} = ["] + [f'    "{item}",' for item in items] + ["]"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-dir", required=True, help="a clone of kohya-ss/sd-scripts")
    parser.add_argument("--commit", default="HEAD")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", f"--git-dir={args.git_dir}", "rev-parse", args.commit], check=True,
                            capture_output=True, text=True).stdout.strip()
    datasets = dataset_keys(args.git_dir, commit)
    print("# Generated by scripts/sd_scripts_keys.py from kohya-ss/sd-scripts: train_network.py's and")
    print("# sdxl_train_network.py's options and config_util.py's dataset schema. Regenerate with a newer commit to")
    print("# see what sd-scripts added.")
    print(f'commit = "{commit}"\n')
    options = config_file_keys(args.git_dir, commit)
    print("[config_file]")
    print(_toml_list("keys", [name for name, _ in options]))
    print("\n[config_file.defaults]  # literal defaults other than None (store_true options: false)")
    for name, default in options:
        if isinstance(default, (bool, int, float, str)):
            print(f"{name} = {_toml_value(default)}")
    print("\n[dataset_config]")
    print(_toml_list("dataset", datasets["dataset"]))
    print(_toml_list("subset", datasets["subset"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
