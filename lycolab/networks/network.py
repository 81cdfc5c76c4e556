"""The adapter network: all adapter modules of a U-Net and its text encoders, as one trainable nn.Module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lycolab.networks.base import AdapterModule
from lycolab.networks.loha import LoHaModule
from lycolab.networks.lora import LoRAModule
from lycolab.networks.naming import TEXT_ENCODER_PREFIX, UNET_PREFIX, text_encoder_targets, unet_targets

ALGORITHM_MODULES: dict[str, type[AdapterModule]] = {"lora": LoRAModule, "locon": LoRAModule, "loha": LoHaModule}


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
        for adapters, lr in ((self.unet_adapters, unet_lr), (self.text_encoder_adapters, text_encoder_lr)):
            params = [param for adapter in adapters for param in adapter.parameters()]
            if params:
                groups.append({"params": params, "lr": default_lr if lr is None else lr})
        return groups

    def network_metadata(self) -> dict[str, str]:
        """The ``ss_network_*`` keys that tell A1111/ComfyUI/sd-scripts how to rebuild this network."""
        hp = self.hyperparameters
        args = {key: str(value) for key, value in hp.items() if key in ("conv_dim", "conv_alpha") and value}
        if self.network_module == "lycoris.kohya":
            args = {"algo": self.algo, **args}
        return {
            "ss_network_module": self.network_module,
            "ss_network_dim": str(hp["dim"]),
            "ss_network_alpha": str(hp["alpha"]),
            "ss_network_args": json.dumps(args),
        }

    def save_weights(self, path: str | Path, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
                     ) -> Path:
        """Write a ``.safetensors`` with kohya/LyCORIS keys and ``ss_*`` metadata, atomically."""
        from lycolab.networks.io import save_adapter_file

        return save_adapter_file(self.state_dict(), path, {**self.network_metadata(), **(metadata or {})}, dtype)


def _default_network_module(algo: str) -> str:
    """LoRA/LoCon files are plain kohya files; LoHa needs LyCORIS to load in sd-scripts and A1111."""
    return "lycoris.kohya" if algo == "loha" else "networks.lora"


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
) -> AdapterNetwork:
    """Wrap the U-Net (and text encoders, when given) in place and return the trainable adapter network.

    ``conv_dim`` enables kxk convs (LoCon-style). Like LyCORIS, ``locon``/``loha`` default it to ``dim`` and
    ``conv_alpha`` to ``alpha``; plain ``lora`` keeps convs off unless ``conv_dim`` is given, like kohya.
    """
    if algo not in ALGORITHM_MODULES:
        raise ValueError(f"unknown algo {algo!r}; choose one of {', '.join(ALGORITHM_MODULES)}")
    if dim < 1:
        raise ValueError(f"network dim must be at least 1, got {dim}")
    if conv_dim is None:
        conv_dim = 0 if algo == "lora" else dim
    if conv_alpha is None:
        conv_alpha = alpha
    module_class = ALGORITHM_MODULES[algo]
    targets = (unet_targets(unet, conv_dim > 0) if unet is not None else []) + text_encoder_targets(text_encoders or [])
    adapters = []
    for target in targets:
        if target.is_conv_kxk:
            if conv_dim <= 0:
                continue
            adapters.append(module_class(target.lora_name, target.module, conv_dim, conv_alpha, multiplier))
        else:
            adapters.append(module_class(target.lora_name, target.module, dim, alpha, multiplier))
    hyperparameters = {"dim": dim, "alpha": alpha if alpha else dim, "conv_dim": conv_dim, "conv_alpha": conv_alpha}
    network = AdapterNetwork(adapters, algo, network_module or _default_network_module(algo), hyperparameters)
    network.apply_to()
    return network
