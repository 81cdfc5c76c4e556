"""Adapter files: atomic ``.safetensors`` writes with ``ss_*`` metadata, and loading any kohya/LyCORIS file back."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from lycolab.files import save_safetensors
from lycolab.models.detect import is_sdxl_unet
from lycolab.networks.base import AdapterModule, AdapterShapeError
from lycolab.networks.naming import UNET_PREFIX, canonical_named_modules, lora_name, text_encoder_prefix
from lycolab.networks.norm import MARKER as NORM_MARKER
from lycolab.networks.norm import NormAdapter, is_trainable_norm
from lycolab.networks.registry import algorithm_names, algorithm_of_module

logger = logging.getLogger(__name__)

# Keys of adapters no registered algorithm rebuilds (lycolab.networks.registry knows the rest), with a readable name;
# each is dropped from here when its algorithm lands.
UNSUPPORTED_MARKERS = {"lora_A.weight": "peft/diffusers-format lora"}


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
    return save_safetensors(path, tensors, metadata)


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` adapter; other formats are refused (they could run code).

    Whatever the bytes, the result is a readable file's tensors or an :class:`AdapterFileError` naming the file:
    truncated files, corrupt headers and tensors no adapter can hold (NaN/inf, complex, an ``alpha`` that is not one
    number) are refused here, before any model is touched.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"{path}: only .safetensors adapters are loaded (pickled files can run code)")
    if not path.is_file():
        raise AdapterFileError(f"{path}: file not found; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as error:
        message = f"{path}: not a readable safetensors file ({_first_line(error)}); re-download or re-save it"
        raise AdapterFileError(message) from None
    check_adapter_tensors(path, tensors)
    return tensors, metadata


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def _all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point():
        return True
    try:
        return bool(torch.isfinite(tensor).all())
    except (RuntimeError, NotImplementedError):  # float8 and other storage-only types
        return bool(torch.isfinite(tensor.float()).all())


def check_adapter_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse values no adapter can hold: applied, they would silently turn every image black or every loss NaN."""
    complex_keys = [key for key, tensor in tensors.items() if tensor.is_complex()]
    if complex_keys:
        raise AdapterFileError(f"{path}: {len(complex_keys)} tensor(s) are complex numbers, which no adapter holds "
                               f"({_summarise(complex_keys)}); re-download or re-save the file")
    not_finite = [key for key, tensor in tensors.items() if not _all_finite(tensor)]
    if not_finite:
        raise AdapterFileError(f"{path}: {len(not_finite)} tensor(s) hold NaN or infinite values "
                               f"({_summarise(not_finite)}); the training that wrote it diverged: use an earlier "
                               "epoch's file, or retrain with a lower learning rate")
    bad_alpha = [key for key, tensor in tensors.items() if key.endswith(".alpha") and tensor.numel() != 1]
    if bad_alpha:
        raise AdapterFileError(f"{path}: alpha must be one number, but {_summarise(bad_alpha)} has shape "
                               f"{list(tensors[bad_alpha[0]].shape)}; re-download or re-save the file")


def group_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"lora_unet_x.lora_down.weight": t}`` → ``{"lora_unet_x": {"lora_down.weight": t}}``."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module_name, _, parameter = key.partition(".")
        grouped.setdefault(module_name, {})[parameter] = value
    return grouped


def unsupported_algorithm(parameters: dict[str, torch.Tensor]) -> str | None:
    for marker, name in UNSUPPORTED_MARKERS.items():
        if marker in parameters:
            return name
    return None


def adaptable_layers(unet: nn.Module | None, text_encoders: list[nn.Module]) -> dict[str, nn.Module]:
    """Every Linear/Conv2d (and affine LayerNorm/GroupNorm, for ``train_norm`` files) under its file name: files
    may target layers beyond our defaults (e.g. conv_in). An SDXL U-Net's layers answer to both sd-scripts'
    original-layout names and LyCORIS' diffusers-layout ones."""
    roots = [(UNET_PREFIX, unet)] if unet is not None else []
    roots += [(text_encoder_prefix(i, len(text_encoders)), te) for i, te in enumerate(text_encoders)]
    layers = {}
    for prefix, root in roots:
        diffusers_paths = dict(root.named_modules()) if is_sdxl_unet(root) else {}
        for path, module in [*canonical_named_modules(root), *diffusers_paths.items()]:
            if path and (isinstance(module, (nn.Linear, nn.Conv2d)) or is_trainable_norm(module)):
                layers.setdefault(lora_name(prefix, path), module)
    return layers


# Errors from rebuilding a module out of a file's tensors that mean "these tensors do not make this algorithm" (a
# missing factor, a 1-D or empty matrix, a rank of 0); the file is the problem, so they become AdapterFileError.
MALFORMED_TENSOR_ERRORS = (KeyError, IndexError, RuntimeError, ValueError, ZeroDivisionError, TypeError)


def build_adapters(path: Path, tensors: dict[str, torch.Tensor], layers: dict[str, nn.Module], multiplier: float
                   ) -> tuple[list[AdapterModule], list[str], dict[str, list[str]]]:
    """(adapters, module names matching no layer, reason → module names skipped) from a file's tensors.

    Nothing here touches the model: the adapters only hold references to their layers until ``apply_to``.
    """
    adapters, unmatched, skipped = [], [], {}
    for module_name, parameters in group_by_module(tensors).items():
        if module_name not in layers:
            unmatched.append(module_name)
            continue
        layer = layers[module_name]
        if NORM_MARKER in parameters:
            if not is_trainable_norm(layer):
                raise AdapterFileError(f"{path}: {module_name} holds {_summarise(sorted(parameters))}, which do not "
                                       f"fit its {type(layer).__name__} layer; is the adapter for another model?")
            try:
                adapters.append(NormAdapter.from_weights(module_name, layer, parameters, multiplier))
            except AdapterShapeError as error:
                raise AdapterFileError(f"{path}: {_first_line(error)}") from None
            continue
        algorithm = algorithm_of_module(parameters)
        if algorithm is None:
            other = unsupported_algorithm(parameters)
            reason = (f"use {other}, which lycolab cannot apply" if other is not None else
                      f"hold no tensors of a known algorithm ({_summarise(sorted(parameters))})")
            skipped.setdefault(reason, []).append(module_name)
            continue
        if "dora_scale" in parameters and not algorithm.module_class.reads_dora_scale:
            raise AdapterFileError(f"{path}: {module_name} uses DoRA (dora_scale) with {algorithm.name}, which "
                                   "lycolab cannot apply")
        try:
            adapters.append(algorithm.module_class.from_weights(module_name, layers[module_name], parameters,
                                                                multiplier))
        except AdapterShapeError as error:
            raise AdapterFileError(f"{path}: {_first_line(error)}") from None
        except MALFORMED_TENSOR_ERRORS as error:
            raise AdapterFileError(f"{path}: {module_name} has incomplete or malformed {algorithm.name} tensors "
                                   f"({_first_line(error)}); re-download or re-save the file") from None
    return adapters, unmatched, skipped


def _summarise(names: list[str]) -> str:
    shown = [name if name.isprintable() and len(name) <= 120 else repr(name)[:120] for name in names[:5]]
    return ", ".join(shown) + (" …" if len(names) > 5 else "")


def load_network(
    path: str | Path,
    unet: nn.Module | None,
    text_encoders: list[nn.Module] | None = None,
    multiplier: float = 1.0,
    apply: bool = True,
):
    """Rebuild an adapter from a file (ours, sd-scripts' or LyCORIS'), apply it to the model and return it.

    The algorithm, each module's rank and layout (tucker, LoKr factors) come from the keys and shapes. Modules
    naming no layer of the given model, or using an algorithm lycolab cannot rebuild, are reported (count and first
    few) rather than silently dropped. With ``apply=False`` the model is left untouched (e.g. to merge instead).
    """
    from lycolab.networks.network import AdapterNetwork, default_network_module

    path = Path(path)
    tensors, metadata = read_adapter_file(path)
    tensors, metadata = _in_kohya_layout(path, tensors, metadata, unet)
    layers = adaptable_layers(unet, text_encoders or [])
    adapters, unmatched, skipped = build_adapters(path, tensors, layers, multiplier)
    if unmatched:
        logger.warning("%s: %d module(s) match no layer of this model and were skipped: %s", path.name,
                       len(unmatched), _summarise(unmatched))
    for reason, names in skipped.items():
        logger.warning("%s: %d module(s) %s; skipped: %s", path.name, len(names), reason, _summarise(names))
    if not adapters:
        raise AdapterFileError(f"{path}: no module of this file can be applied to this model; is it an adapter "
                               "for this model's family (SD 1.x/2.x or SDXL)?")
    ranked = [adapter for adapter in adapters if isinstance(adapter, AdapterModule)] or [None]
    algorithms = {adapter.algo for adapter in ranked if adapter is not None}
    algo = metadata_algorithm(metadata) or (algorithms.pop() if len(algorithms) == 1 else "lora")
    hyperparameters = {"dim": metadata.get("ss_network_dim", getattr(ranked[0], "dim", 1)),
                       "alpha": metadata.get("ss_network_alpha", float(getattr(ranked[0], "alpha", 1.0)))}
    network_module = metadata.get("ss_network_module", default_network_module(algo))
    network = AdapterNetwork(adapters, algo, network_module, hyperparameters)
    if apply:
        network.apply_to()
    return network


def _in_kohya_layout(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], unet: nn.Module | None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A PEFT/diffusers-layout LoRA (``unet.….lora_A.weight``, what diffusers saves) in kohya's names, converted in
    memory (ΔW unchanged) so it applies like any other file; kohya/LyCORIS files pass through."""
    from lycolab.tools.convert import PEFT, SD, SDXL, file_layout, peft_to_kohya

    if file_layout(tensors) != PEFT:
        return tensors, metadata
    family = SDXL if unet is not None and is_sdxl_unet(unet) else SD
    try:
        converted, converted_metadata, _, _ = peft_to_kohya(path, tensors, metadata, family)
    except (ValueError, KeyError, IndexError, RuntimeError) as error:
        raise AdapterFileError(f"{path}: a PEFT/diffusers-layout LoRA that cannot be read ({_first_line(error)}); "
                               "re-save it, or convert it with lycolab convert --to kohya") from None
    logger.info("%s: a PEFT/diffusers-layout LoRA, read in kohya's names", path.name)
    return converted, converted_metadata


def metadata_algorithm(metadata: dict[str, str]) -> str | None:
    """The ``algo`` recorded in ``ss_network_args``, if it names one; any other metadata is only informative."""
    try:
        algo = json.loads(metadata.get("ss_network_args", "{}")).get("algo")
    except (json.JSONDecodeError, AttributeError, RecursionError):
        return None
    return algo.lower() if isinstance(algo, str) and algo.lower() in algorithm_names() else None


