"""Adapter files: atomic ``.safetensors`` writes with ``ss_*`` metadata, and loading any kohya/LyCORIS file back."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file
from torch import nn

from lycolab.files import atomic_write
from lycolab.networks.naming import UNET_PREFIX, canonical_named_modules, lora_name, text_encoder_prefix

logger = logging.getLogger(__name__)

# The key that identifies each algorithm's module in a file.
ALGORITHM_MARKERS = {"lora_down.weight": "lora", "hada_w1_a": "loha", "lokr_w1": "lokr", "lokr_w1_a": "lokr"}


class AdapterFileError(ValueError):
    """An adapter file that cannot be loaded; the message names the file and what to do."""


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` / ``sshs_legacy_hash`` as A1111's additional-networks computes them.

    Only ``ss_*`` metadata enters the hash, so user-added metadata does not change a network's identity.
    """
    blob = save(tensors, {key: value for key, value in metadata.items() if key.startswith("ss_")})
    header_length = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_length :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def save_adapter_file(
    state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str], dtype: torch.dtype | None = None
) -> Path:
    """Write tensors (cast to ``dtype``) and string metadata via temp file + fsync + rename: never half-written."""
    tensors = {
        key: (value.detach().to("cpu", dtype) if dtype is not None and value.is_floating_point() else value.detach())
        .cpu()
        .contiguous()
        for key, value in state_dict.items()
    }
    metadata = {key: str(value) for key, value in metadata.items() if value is not None}
    metadata.update(model_hashes(tensors, metadata))
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata))


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` adapter; other formats are refused (they could run code)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"{path}: only .safetensors adapters are loaded (pickled files can run code)")
    if not path.is_file():
        raise AdapterFileError(f"{path}: file not found; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as error:
        message = f"{path}: not a readable safetensors file ({error}); re-download or re-save it"
        raise AdapterFileError(message) from None


def group_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"lora_unet_x.lora_down.weight": t}`` → ``{"lora_unet_x": {"lora_down.weight": t}}``."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module_name, _, parameter = key.partition(".")
        grouped.setdefault(module_name, {})[parameter] = value
    return grouped


def detect_algorithm(parameters: dict[str, torch.Tensor]) -> str | None:
    for marker, algo in ALGORITHM_MARKERS.items():
        if marker in parameters:
            return algo
    return None


def adaptable_layers(unet: nn.Module | None, text_encoders: list[nn.Module]) -> dict[str, nn.Module]:
    """Every Linear/Conv2d under its file name: files may target layers beyond our defaults (e.g. conv_in)."""
    roots = [(UNET_PREFIX, unet)] if unet is not None else []
    roots += [(text_encoder_prefix(i, len(text_encoders)), te) for i, te in enumerate(text_encoders)]
    layers = {}
    for prefix, root in roots:
        for path, module in canonical_named_modules(root):
            if path and isinstance(module, (nn.Linear, nn.Conv2d)):
                layers[lora_name(prefix, path)] = module
    return layers


def module_rank(algo: str, parameters: dict[str, torch.Tensor]) -> int:
    if algo == "lora":
        return parameters["lora_down.weight"].shape[0]
    return parameters["hada_w1_b"].shape[0]


def load_network(
    path: str | Path,
    unet: nn.Module | None,
    text_encoders: list[nn.Module] | None = None,
    multiplier: float = 1.0,
):
    """Rebuild an adapter from a file (ours, sd-scripts' or LyCORIS'), apply it to the model and return it.

    The algorithm and each module's rank come from the keys and shapes; keys naming no layer of the given model are
    reported (count and first few) rather than silently dropped.
    """
    from lycolab.networks.network import ALGORITHM_MODULES, AdapterNetwork

    path = Path(path)
    tensors, metadata = read_adapter_file(path)
    layers = adaptable_layers(unet, text_encoders or [])
    adapters, unmatched, algorithms = [], [], set()
    for module_name, parameters in group_by_module(tensors).items():
        algo = detect_algorithm(parameters)
        if module_name not in layers or algo is None:
            unmatched.append(module_name)
            continue
        if algo not in ALGORITHM_MODULES:
            raise AdapterFileError(f"{path}: {algo} modules are not supported yet; use a LoRA/LoCon/LoHa file")
        alpha = parameters.get("alpha")
        module = ALGORITHM_MODULES[algo](
            module_name, layers[module_name], module_rank(algo, parameters),
            None if alpha is None else float(alpha), multiplier,
        )
        state = dict(parameters)
        state.setdefault("alpha", module.alpha)
        module.load_state_dict(state, strict=True)
        adapters.append(module)
        algorithms.add(algo)
    if unmatched:
        logger.warning("%s: %d module(s) match no layer of this model and were skipped: %s%s", path.name,
                       len(unmatched), ", ".join(unmatched[:5]), " …" if len(unmatched) > 5 else "")
    if not adapters:
        raise AdapterFileError(f"{path}: no key matches this model; is it an adapter for SD 1.x/2.x?")
    algo = metadata_algorithm(metadata) or (algorithms.pop() if len(algorithms) == 1 else "lora")
    hyperparameters = {"dim": metadata.get("ss_network_dim", adapters[0].dim),
                       "alpha": metadata.get("ss_network_alpha", float(adapters[0].alpha))}
    network = AdapterNetwork(adapters, algo, metadata.get("ss_network_module", "networks.lora"), hyperparameters)
    network.apply_to()
    return network


def metadata_algorithm(metadata: dict[str, str]) -> str | None:
    """The ``algo`` recorded in ``ss_network_args``, if any."""
    try:
        return json.loads(metadata.get("ss_network_args", "{}")).get("algo")
    except (json.JSONDecodeError, AttributeError):
        return None


