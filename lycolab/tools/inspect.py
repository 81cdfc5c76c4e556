"""What an adapter file holds, without applying it: its algorithm, modules, ranks and alphas, the training settings
in its ``ss_*`` metadata, the most frequent caption tags, the dataset folders and the hashes A1111/Civitai use.

Only the safetensors header (names, shapes, dtypes, metadata) and the one-number ``alpha`` tensors are read, so a
200 MB file is inspected in a moment. Metadata is whatever the writer put there: a value that does not parse is
shown as written or left out, never an error.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lycolab.display import ShownAsTable, Table
from lycolab.networks.io import AdapterFileError, unsupported_algorithm
from lycolab.networks.registry import algorithm_of_module
from lycolab.publish import (
    NETWORK_SETTINGS,
    TOP_TAGS,
    TRAINING_SETTINGS,
    dataset_resolutions,
    is_shown,
    network_arg_rows,
    top_tags,
)

# The tensor holding a module's rank, and which of its dimensions (LoRA, LoHa, LoKr's low-rank factor, PEFT)
RANK_TENSORS = (("lora_down.weight", 0), ("hada_w1_b", 0), ("lokr_w2_a", 1), ("lokr_w1_a", 1), ("lora_A.weight", 0))
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight",
                 ".lora.down.weight", ".lora.up.weight")
HASH_KEYS = (("model hash (sshs_model_hash)", "sshs_model_hash"), ("legacy hash (sshs_legacy_hash)",
                                                                   "sshs_legacy_hash"))
MAX_LISTED = 8


@dataclass
class AdapterInfo(ShownAsTable):
    """One adapter file, as a table of what it is, how it was trained and on what."""

    path: Path
    layout: str  # "kohya" (lora_unet_… / lora_te…) or "peft" (unet.….lora_A.weight)
    algorithms: dict[str, int]  # title → module count ("unknown (…)" for modules no algorithm claims)
    components: dict[str, int]  # "U-Net" / "text encoder …" → module count
    ranks: dict[int, int]  # rank → module count
    alphas: dict[float, int]  # alpha → module count
    settings: list[tuple[str, str]]  # (label, value) from ss_* metadata
    tags: list[tuple[str, int]] = field(default_factory=list)
    dataset_dirs: list[tuple[str, str]] = field(default_factory=list)  # (folder, "N images × R repeats")
    hashes: list[tuple[str, str]] = field(default_factory=list)
    size_bytes: int = 0
    dtypes: list[str] = field(default_factory=list)

    def table(self) -> Table:
        rows = [("file", f"{self.path.name} ({self.size_bytes / 2**20:.1f} MiB, {', '.join(self.dtypes) or '-'})"),
                ("layout", "PEFT/diffusers" if self.layout == "peft" else "kohya/LyCORIS"),
                ("algorithm", _counts(self.algorithms) or "no adapter modules")]
        rows += [("modules", _counts(self.components))] if self.components else []
        rows += [("ranks", _counts(self.ranks)), ("alphas", _counts(self.alphas) or "none (alpha = rank)")]
        rows += self.settings
        rows += [("top tags", ", ".join(f"{tag} ({count})" for tag, count in self.tags))] if self.tags else []
        rows += [(f"dataset {folder}", value) for folder, value in self.dataset_dirs]
        rows += self.hashes
        notes = [] if self.settings else ["no training metadata (ss_*) in the file"]
        return Table([{"": label, "value": value} for label, value in rows], title=f"adapter {self.path.name}",
                     notes=notes)


def _counts(counts: dict) -> str:
    ordered = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    shown = [f"{_number(value)} ({count})" for value, count in ordered[:MAX_LISTED]]
    return ", ".join(shown) + (f", … {len(ordered) - MAX_LISTED} more" if len(ordered) > MAX_LISTED else "")


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def inspect_adapter(path: str | Path, top: int = TOP_TAGS) -> AdapterInfo:
    """Read ``path``'s header (and its alpha scalars) into an :class:`AdapterInfo`; ``top`` caption tags shown."""
    path = Path(path)
    shapes, dtypes, metadata = _read_header(path)
    layout = "peft" if any(key.endswith(PEFT_SUFFIXES) for key in shapes) else "kohya"
    modules = _modules(shapes, layout)
    algorithms: Counter[str] = Counter()
    ranks: Counter[int] = Counter()
    for name, parameters in modules.items():
        algorithms[_algorithm_title(path, name, parameters, layout)] += 1
        rank = next((parameters[name].shape[axis] for name, axis in RANK_TENSORS
                     if name in parameters and len(parameters[name].shape) > axis), None)
        if rank is not None:
            ranks[int(rank)] += 1
    return AdapterInfo(
        path=path, layout=layout, algorithms=dict(algorithms), components=_components(modules, layout),
        ranks=dict(ranks), alphas=_alphas(path, shapes, metadata, layout), settings=settings_rows(metadata),
        tags=top_tags(metadata, top), dataset_dirs=dataset_dirs(metadata),
        hashes=[(label, metadata[key]) for label, key in HASH_KEYS if is_shown(metadata.get(key))],
        size_bytes=path.stat().st_size, dtypes=sorted(set(dtypes)))


def _read_header(path: Path) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Names → empty tensors of the file's shapes and dtypes on the meta device (no data read), the dtypes, and
    the metadata."""
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"{path}: only .safetensors adapters are read (pickled files can run code)")
    if not path.is_file():
        raise AdapterFileError(f"{path}: file not found; check the path (trained adapters are in output/)")
    shapes, dtypes = {}, []
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                dtype = _torch_dtype(tensor_slice.get_dtype())
                shapes[key] = torch.empty(tensor_slice.get_shape(), dtype=dtype, device="meta")
                dtypes.append(str(dtype).removeprefix("torch."))
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise AdapterFileError(f"{path}: not a readable safetensors file ({reason}); re-download or re-save it"
                               ) from None
    return shapes, dtypes, metadata


def _torch_dtype(name: str) -> torch.dtype:
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    return names.get(str(name).upper(), torch.uint8)


def _modules(shapes: dict[str, torch.Tensor], layout: str) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in shapes.items():
        if layout == "peft":
            suffix = next((suffix for suffix in PEFT_SUFFIXES if key.endswith(suffix)), None)
            if suffix is None:
                continue
            name, parameter = key[: -len(suffix)], "lora_A.weight" if "lora_A" in suffix or "down" in suffix \
                else "lora_B.weight"
        else:
            name, _, parameter = key.partition(".")
        modules.setdefault(name, {})[parameter] = tensor
    return modules


def _algorithm_title(path: Path, name: str, parameters: dict[str, torch.Tensor], layout: str) -> str:
    if layout == "peft":
        return "LoRA / LoCon (PEFT)"
    try:
        algorithm = algorithm_of_module(parameters)
    except Exception:  # an ``accepts`` that needs values, not shapes: ask again with this module's real tensors
        algorithm = algorithm_of_module(_real_tensors(path, name, parameters))
    if algorithm is not None:
        return algorithm.title
    other = unsupported_algorithm(parameters)
    return f"{other} (lycolab cannot apply it)" if other else "unknown"


def _real_tensors(path: Path, name: str, parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {parameter: handle.get_tensor(f"{name}.{parameter}") for parameter in parameters}


def _components(modules: dict, layout: str) -> dict[str, int]:
    titles = {"lora_unet": "U-Net", "lora_te": "text encoder", "lora_te1": "text encoder 1",
              "lora_te2": "text encoder 2", "unet": "U-Net", "text_encoder": "text encoder",
              "text_encoder_2": "text encoder 2"}
    counts: Counter[str] = Counter()
    for name in modules:
        head = name.split(".")[0] if layout == "peft" else "_".join(name.split("_")[:2])
        counts[titles.get(head, "other")] += 1
    return dict(counts)


def _alphas(path: Path, shapes: dict[str, torch.Tensor], metadata: dict[str, str], layout: str) -> dict[float, int]:
    """The ``alpha`` scalars (read one by one: a few bytes each); a PEFT file's from the metadata it carries."""
    if layout == "peft":
        return _peft_alphas(path, shapes, metadata)
    from safetensors import safe_open

    keys = [key for key, tensor in shapes.items() if key.endswith(".alpha") and tensor.numel() == 1]
    counts: Counter[float] = Counter()
    with safe_open(str(path), framework="pt") as handle:
        for key in keys:
            counts[round(float(handle.get_tensor(key).float()), 6)] += 1
    return dict(counts)


def _peft_alphas(path: Path, shapes: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[float, int]:
    """Each module's alpha in kohya's terms: the one we recorded when converting, else diffusers' LoraConfig
    scale × rank (no config: alpha = rank)."""
    from lycolab.tools.convert import DIFFUSERS_METADATA_KEY, KOHYA_ALPHAS_KEY, json_object, peft_module_scale

    recorded, config = json_object(metadata.get(KOHYA_ALPHAS_KEY)), json_object(metadata.get(DIFFUSERS_METADATA_KEY))
    counts: Counter[float] = Counter()
    for name, parameters in _modules(shapes, "peft").items():
        down = parameters.get("lora_A.weight")
        if down is None or down.dim() < 2:
            continue
        alpha = recorded.get(name)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            try:
                alpha = peft_module_scale(path, name, down.shape[0], config) * down.shape[0]
            except (AdapterFileError, TypeError, ValueError, ZeroDivisionError):
                continue
        counts[round(float(alpha), 6)] += 1
    return dict(counts)


def settings_rows(metadata: dict[str, str]) -> list[tuple[str, str]]:
    """The model card's settings (lycolab.publish's labels) as (label, value) rows, network rows first."""
    rows = [(label, metadata[key]) for label, key in NETWORK_SETTINGS if is_shown(metadata.get(key))]
    rows += [(label, value) for label, _, value in network_arg_rows(metadata.get("ss_network_args"))]
    rows += [(label, metadata[key]) for label, key in TRAINING_SETTINGS if is_shown(metadata.get(key))]
    if not is_shown(metadata.get("ss_resolution")):
        rows += [("Resolution", resolution) for resolution in dataset_resolutions(metadata)]
    return [(label, " ".join(str(value).split())[:200]) for label, value in rows]


def dataset_dirs(metadata: dict[str, str]) -> list[tuple[str, str]]:
    """``ss_dataset_dirs`` (``{"10_cat": {"n_repeats": 10, "img_count": 24}}``) as (folder, "24 images × 10")."""
    try:
        folders = json.loads(metadata.get("ss_dataset_dirs") or "{}")
    except (ValueError, RecursionError):
        return []
    rows = []
    for folder, info in folders.items() if isinstance(folders, dict) else ():
        info = info if isinstance(info, dict) else {}
        images, repeats = info.get("img_count", "?"), info.get("n_repeats", "?")
        rows.append((" ".join(str(folder).split())[:120], f"{images} images × {repeats} repeats"))
    return rows[:50]
