"""Write docs/sd-scripts-parity.md: every option of sd-scripts' train_network.py and every dataset_config key
(tests/data/sd_scripts_keys.toml) → where lycolab implements it, or why it refuses it.

"Where" is found, not written by hand: the lycolab modules (outside config.py, which only reads and checks values)
that read the key's value — ``config.KEY`` / ``subset.KEY`` / ``dataset.KEY`` attribute reads, or the key name
quoted. A refusal's reason comes from ``lycolab.unsupported.REFUSED_OPTIONS``. ``--check`` exits 1 when the
committed page differs (the tests run it).

    python scripts/parity_table.py          # write
    python scripts/parity_table.py --check  # verify
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
KEYS = ROOT / "tests" / "data" / "sd_scripts_keys.toml"
PAGE = ROOT / "docs" / "sd-scripts-parity.md"
sys.path.insert(0, str(ROOT))

# keys that are not TrainConfig fields but are implemented another way
OTHER_WAYS = {
    "config_file": "`lycolab train --config_file`",
    "caption_extention": "sd-scripts' misspelt alias, read as `caption_extension`",
    "image_dir": "each subset's folder (lycolab/data/scan.py)",
    "class_tokens": "a subset's caption when an image has none (lycolab/data/scan.py)",
    "is_reg": "regularization subsets (lycolab/data/dataset.py)",
    "num_repeats": "a subset's repeats (lycolab/data/dataset.py)",
    "batch_size": "a dataset's batch size (lycolab/data/dataset.py)",
    "save_model_as": "always `.safetensors`; `ckpt`/`pt` write `.safetensors` and say so (a pickle can run code)",
    "use_8bit_adam": "sd-scripts' old flag: `optimizer_type = AdamW8bit` (`lycolab/config.py`)",
    "use_lion_optimizer": "sd-scripts' old flag: `optimizer_type = Lion` (`lycolab/config.py`)",
    "max_data_loader_n_workers": "DataLoader worker processes read images ahead, at most one per CPU "
                                 "(`lycolab/training/batch_loader.py`); the result is the same for any number",
    "persistent_data_loader_workers": "one loader serves the whole run, so its workers always persist "
                                      "(`lycolab/training/batch_loader.py`)",
    "no_half_vae": "the VAE always runs in float32 in lycolab (what the option asks for)",
    "log_with": "`tensorboard`: TensorBoard events in `logging_dir` (`lycolab/training/logs.py`); wandb is refused",
    "reg_data_dir": "its `N_name` folders become regularization subsets (`lycolab/config.py`)",
    "train_data_dir": "its `N_name` folders become subsets, one level deep (`lycolab/config.py`)",
    "dataset_config": "`lycolab train --dataset_config` or the key (`lycolab/config.py`)",
}


def keys() -> dict[str, list[str]]:
    document = tomllib.loads(KEYS.read_text(encoding="utf-8"))
    return {"config_file": document["config_file"]["keys"],
            "dataset_config": sorted(set(document["dataset_config"]["dataset"] + document["dataset_config"]["subset"]))}


def _sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in sorted((ROOT / "lycolab").rglob("*.py"))
            if path.name != "config.py" and path.name != "unsupported.py"}


def readers(key: str, sources: dict[Path, str]) -> list[str]:
    """The modules that read ``key``'s value."""
    pattern = re.compile(rf"(?:\.{re.escape(key)}\b|[\"']{re.escape(key)}[\"'])")
    return [str(path.relative_to(ROOT)) for path, text in sources.items() if pattern.search(text)]


def status(key: str, section: str, sources: dict[Path, str]) -> str:
    from lycolab.config import DatasetConfig, SubsetConfig, TrainConfig
    from lycolab.unsupported import REFUSED_OPTIONS

    if key in REFUSED_OPTIONS:
        return f"refused: {REFUSED_OPTIONS[key][1]}"
    if key in OTHER_WAYS:
        return f"implemented: {OTHER_WAYS[key]}"
    if key.startswith("metadata_"):
        return f"implemented: `modelspec.{key[len('metadata_'):]}` in every saved file (`lycolab/training/metadata.py`)"
    classes = (TrainConfig,) if section == "config_file" else (DatasetConfig, SubsetConfig)
    if any(key in {field.name for field in dataclasses.fields(cls)} for cls in classes):
        found = readers(key, sources)
        return "implemented: " + (", ".join(f"`{name}`" for name in found) if found else "read in config.py only")
    return "MISSING"


def page() -> str:
    sources = _sources()
    document = tomllib.loads(KEYS.read_text(encoding="utf-8"))
    lines = ["# sd-scripts parity", "",
             "Every option of sd-scripts' `train_network.py` and `sdxl_train_network.py` and every "
             "`dataset_config.toml` key "
             f"(sd-scripts commit `{document['commit'][:12]}`, extracted by `scripts/sd_scripts_keys.py` into "
             "`tests/data/sd_scripts_keys.toml`), and where lycolab implements it — the modules that read its value — "
             "or why it refuses it. A refused key set to sd-scripts' default (as generated files write it) means "
             "\"off\" and is accepted; any other value stops with one line naming the key. Generated by "
             "`scripts/parity_table.py`; the tests fail when it is out of date.", ""]
    for section, names in keys().items():
        lines += [f"## {section}", "", "| key | lycolab |", "|---|---|"]
        lines += [f"| `{name}` | {status(name, section, sources).replace('|', chr(92) + '|')} |" for name in names]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/sd-scripts-parity.md is stale")
    args = parser.parse_args(argv)
    text = page()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
            print(f"stale: {PAGE.relative_to(ROOT)} (run python scripts/parity_table.py)")
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
