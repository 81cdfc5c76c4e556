"""The adapter network: all adapter modules of a U-Net and its text encoders, as one trainable nn.Module."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lycolab.networks.base import AdapterModule
from lycolab.networks.naming import TEXT_ENCODER_PREFIX, UNET_PREFIX, text_encoder_targets, unet_targets
from lycolab.networks.registry import AdapterOptions, changed_options, get_algorithm, make_options

logger = logging.getLogger(__name__)

NETWORK_MODULES = ("networks.lora", "lycoris.kohya")
# What sd-scripts' networks.lora can build: LoRA, and LoCon when conv_dim is set.
KOHYA_ALGORITHMS = ("lora", "locon")
# Options sd-scripts' networks.lora reads (the rest are LyCORIS')
KOHYA_OPTIONS = ("dropout", "rank_dropout", "module_dropout")


class AdapterNetwork(nn.Module):
    """Holds the adapter modules under their file names, so ``state_dict()`` keys are the file's keys."""

    def __init__(self, adapters: list[AdapterModule], algo: str, network_module: str, hyperparameters: dict[str, Any]):
        super().__init__()
        self.algo = algo
        self.network_module = network_module
        self.hyperparameters = hyperparameters
        for adapter in adapters:
            self.add_module(adapter.lora_name, adapter)

    @property
    def adapters(self) -> list[AdapterModule]:
        return [module for module in self.children() if isinstance(module, AdapterModule)]

    @property
    def unet_adapters(self) -> list[AdapterModule]:
        return [adapter for adapter in self.adapters if adapter.lora_name.startswith(UNET_PREFIX)]

    @property
    def text_encoder_adapters(self) -> list[AdapterModule]:
        return [adapter for adapter in self.adapters if adapter.lora_name.startswith(TEXT_ENCODER_PREFIX)]

    def apply_to(self) -> None:
        for adapter in self.adapters:
            adapter.apply_to()

    def restore(self) -> None:
        """Detach from the model: every wrapped layer runs its original forward again."""
        for adapter in self.adapters:
            adapter.restore()

    def set_multiplier(self, multiplier: float) -> None:
        for adapter in self.adapters:
            adapter.multiplier = multiplier

    def parameter_groups(self, unet_lr: float | None, text_encoder_lr: float | None, default_lr: float) -> list[dict]:
        """Optimizer groups with sd-scripts' rule: unet_lr / text_encoder_lr fall back to learning_rate."""
        groups = []
        for name, adapters, lr in (("unet", self.unet_adapters, unet_lr),
                                   ("textencoder", self.text_encoder_adapters, text_encoder_lr)):
            params = [param for adapter in adapters for param in adapter.parameters()]
            if params:
                groups.append({"params": params, "lr": default_lr if lr is None else lr, "name": name})
        return groups

    def network_args(self) -> dict[str, str]:
        """``network_args`` that rebuild this network in sd-scripts (``networks.lora``) or LyCORIS."""
        hp = self.hyperparameters
        args = {key: str(hp[key]) for key in ("conv_dim", "conv_alpha") if hp.get("conv_dim")}
        options = hp.get("options")
        changed = changed_options(options) if isinstance(options, AdapterOptions) else {}
        if self.network_module == "lycoris.kohya":
            return {"algo": self.algo, **args, **{key: str(value) for key, value in changed.items()}}
        return {**args, **{key: str(changed[key]) for key in ("rank_dropout", "module_dropout") if key in changed}}

    def network_metadata(self) -> dict[str, str]:
        """The ``ss_network_*`` keys that tell A1111/ComfyUI/sd-scripts how to rebuild this network."""
        hp = self.hyperparameters
        metadata = {
            "ss_network_module": self.network_module,
            "ss_network_dim": str(hp["dim"]),
            "ss_network_alpha": str(hp["alpha"]),
            "ss_network_args": json.dumps(self.network_args()),
        }
        if self.network_module == "networks.lora" and hp.get("dropout"):
            metadata["ss_network_dropout"] = str(hp["dropout"])
        return metadata

    def save_weights(self, path: str | Path, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
                     ) -> Path:
        """Write a ``.safetensors`` with kohya/LyCORIS keys and ``ss_*`` metadata, atomically."""
        from lycolab.networks.io import save_adapter_file

        return save_adapter_file(self.state_dict(), path, {**self.network_metadata(), **(metadata or {})}, dtype)


def default_network_module(algo: str) -> str:
    """Plain LoRA is a kohya ``networks.lora`` file; every other algorithm is built the LyCORIS way."""
    return "networks.lora" if algo == "lora" else "lycoris.kohya"


def create_network(
    unet: nn.Module | None,
    text_encoders: list[nn.Module] | None = None,
    algo: str = "lora",
    dim: int = 4,
    alpha: float | None = 1.0,
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
    multiplier: float = 1.0,
    network_module: str | None = None,
    dropout: float = 0.0,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    **algorithm_options: Any,
) -> AdapterNetwork:
    """Wrap the U-Net (and text encoders, when given) in place and return the trainable adapter network.

    ``network_module`` picks the layer set: ``networks.lora`` (sd-scripts: attention blocks, plus ResNet and
    sampler convs when ``conv_dim`` > 0) or ``lycoris.kohya`` (LyCORIS' "full" preset, which also covers the time
    embedding, ``conv_in`` and ``conv_out``). Like LyCORIS, ``lycoris.kohya`` defaults ``conv_dim`` to ``dim`` and
    ``conv_alpha`` to ``alpha``; ``networks.lora`` keeps kxk convs off unless ``conv_dim`` is given, like sd-scripts.
    ``algorithm_options`` are fields of the algorithm's options dataclass (``lycolab.networks.registry``), e.g.
    LoKr's ``factor``; an unknown one is a ValueError naming it.
    """
    network_module = network_module or default_network_module(algo)
    algorithm = _check_arguments(algo, dim, network_module)
    try:
        options = make_options(algorithm.options_class, dropout=float(dropout or 0.0),
                               rank_dropout=float(rank_dropout or 0.0), module_dropout=float(module_dropout or 0.0),
                               **algorithm_options)
    except TypeError as error:
        raise ValueError(f"algo {algo}: {error}") from None
    if options.dropout and not algorithm.uses_dropout:
        logger.warning("dropout is not used by %s (as in LyCORIS); use rank_dropout or module_dropout", algo)
    is_lycoris = network_module == "lycoris.kohya"
    if conv_dim is None:
        conv_dim = dim if is_lycoris and algorithm.adapts_conv else 0
    if conv_alpha is None:
        conv_alpha = alpha
    targets = (unet_targets(unet, conv_dim > 0, is_lycoris) if unet is not None else [])
    targets += text_encoder_targets(text_encoders or [])
    adapters = []
    for target in targets:
        if target.is_conv_kxk and conv_dim <= 0:
            continue
        rank, rank_alpha = (conv_dim, conv_alpha) if target.is_conv_kxk else (dim, alpha)
        adapters.append(algorithm.module_class(target.lora_name, target.module, rank, rank_alpha, multiplier,
                                               options))
    hyperparameters = {"dim": dim, "alpha": alpha if alpha else dim, "conv_dim": conv_dim, "conv_alpha": conv_alpha,
                       "dropout": options.dropout, "rank_dropout": options.rank_dropout,
                       "module_dropout": options.module_dropout, "options": options}
    network = AdapterNetwork(adapters, algo, network_module, hyperparameters)
    network.apply_to()
    return network


def _check_arguments(algo: str, dim: int, network_module: str):
    """The registry's algorithm for ``algo``, after checking it can be built as asked."""
    from lycolab.networks.registry import UnknownAlgorithm

    try:
        algorithm = get_algorithm(algo)
    except UnknownAlgorithm as error:
        raise ValueError(str(error)) from None
    if network_module not in NETWORK_MODULES:
        raise ValueError(f"unknown network_module {network_module!r}; choose one of {', '.join(NETWORK_MODULES)}")
    if network_module == "networks.lora" and algo not in KOHYA_ALGORITHMS:
        raise ValueError(f"algo {algo} needs network_module lycoris.kohya (networks.lora only makes LoRA/LoCon)")
    if dim < 1:
        raise ValueError(f"network dim must be at least 1, got {dim}")
    return algorithm
