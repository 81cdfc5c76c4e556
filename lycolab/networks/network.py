"""The adapter network: all adapter modules of a U-Net and its text encoders, as one trainable nn.Module."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lycolab.models.detect import is_sdxl_unet
from lycolab.networks.base import AdapterModule
from lycolab.networks.block_weights import BlockRanks, BlockWise, block_index, block_ranks, lr_weights
from lycolab.networks.naming import TEXT_ENCODER_PREFIX, UNET_PREFIX, text_encoder_targets, unet_targets
from lycolab.networks.norm import NormAdapter, is_trainable_norm
from lycolab.networks.presets import ModuleOverride, Preset, PresetError, PresetTarget, get_preset, preset_targets
from lycolab.networks.registry import (
    AdapterOptions,
    Algorithm,
    changed_options,
    get_algorithm,
    make_options,
    option_types,
)

logger = logging.getLogger(__name__)

NETWORK_MODULES = ("networks.lora", "lycoris.kohya")
# What sd-scripts' networks.lora can build: LoRA, and LoCon when conv_dim is set.
KOHYA_ALGORITHMS = ("lora", "locon")
# Options sd-scripts' networks.lora reads (the rest are LyCORIS')
KOHYA_OPTIONS = ("dropout", "rank_dropout", "module_dropout")
# The parameters LoRA+ trains faster: sd-scripts and LyCORIS 4.1.3 both test ``"lora_up" in name`` (so LoHa, LoKr
# and the other LyCORIS algorithms have none, there as here)
LORAPLUS_MARKER = "lora_up"


@dataclass(frozen=True)
class LoraPlus:
    """LoRA+ ratios (``loraplus_lr_ratio`` and the U-Net / text-encoder ones, which win where set and non-zero)."""

    ratio: float | None = None
    unet_ratio: float | None = None
    text_encoder_ratio: float | None = None

    def for_unet(self) -> float | None:
        return self.unet_ratio or self.ratio  # sd-scripts' ``or``: a 0 ratio means "not set"

    def for_text_encoder(self) -> float | None:
        return self.text_encoder_ratio or self.ratio

    def network_args(self) -> dict[str, str]:
        values = {"loraplus_lr_ratio": self.ratio, "loraplus_unet_lr_ratio": self.unet_ratio,
                  "loraplus_text_encoder_lr_ratio": self.text_encoder_ratio}
        return {key: str(value) for key, value in values.items() if value is not None}


class AdapterNetwork(nn.Module):
    """Holds the adapter modules under their file names, so ``state_dict()`` keys are the file's keys."""

    def __init__(self, adapters: list[nn.Module], algo: str, network_module: str, hyperparameters: dict[str, Any]):
        super().__init__()
        self.algo = algo
        self.network_module = network_module
        self.hyperparameters = hyperparameters
        for adapter in adapters:
            self.add_module(adapter.lora_name, adapter)

    @property
    def adapters(self) -> list[AdapterModule]:
        """The Linear/Conv2d adapters (what merges, max-norm and estimates read)."""
        return [module for module in self.children() if isinstance(module, AdapterModule)]

    @property
    def norm_adapters(self) -> list[NormAdapter]:
        """``train_norm``'s LayerNorm/GroupNorm offsets."""
        return [module for module in self.children() if isinstance(module, NormAdapter)]

    @property
    def modules_applied(self) -> list[nn.Module]:
        """Every module that wraps a layer of the model: adapters and norm offsets, in file order."""
        return [module for module in self.children() if isinstance(module, (AdapterModule, NormAdapter))]

    @property
    def unet_adapters(self) -> list[AdapterModule]:
        return [adapter for adapter in self.adapters if adapter.lora_name.startswith(UNET_PREFIX)]

    @property
    def text_encoder_adapters(self) -> list[AdapterModule]:
        return [adapter for adapter in self.adapters if adapter.lora_name.startswith(TEXT_ENCODER_PREFIX)]

    def apply_to(self) -> None:
        for module in self.modules_applied:
            module.apply_to()

    def restore(self) -> None:
        """Detach from the model: every wrapped layer runs its original forward again."""
        for module in self.modules_applied:
            module.restore()

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.modules_applied:
            module.multiplier = multiplier

    def parameter_groups(self, unet_lr: float | None, text_encoder_lr: float | None, default_lr: float) -> list[dict]:
        """Optimizer groups as sd-scripts' ``prepare_optimizer_params`` makes them (LyCORIS' is the same without
        block weights): unet_lr / text_encoder_lr fall back to learning_rate; with LoRA+ the ``lora_up`` weights
        form a "… plus" group at lr × ratio; with block lr weights the U-Net is one group per block
        (``unet_block7``) at unet_lr × its weight; a group whose lr is 0 is left out (not trained). Groups come
        U-Net first, then text encoders (sd-scripts lists the text encoders first; the sets and lrs are the same).
        """
        hp = self.hyperparameters
        loraplus = hp.get("loraplus") or LoraPlus()
        unet_lr = default_lr if unet_lr is None else unet_lr
        text_encoder_lr = default_lr if text_encoder_lr is None else text_encoder_lr
        unet_modules = [module for module in self.modules_applied if module.lora_name.startswith(UNET_PREFIX)]
        text_modules = [module for module in self.modules_applied
                        if module.lora_name.startswith(TEXT_ENCODER_PREFIX)]
        weights = hp.get("block_lr_weights")
        groups = []
        if weights is not None and unet_modules:
            sdxl = any("input_blocks" in m.lora_name or "output_blocks" in m.lora_name for m in unet_modules)
            blocks: dict[int, list[nn.Module]] = {}
            for module in unet_modules:
                blocks.setdefault(block_index(module.lora_name, sdxl), []).append(module)
            for index, modules in blocks.items():
                groups += _lora_plus_groups(f"unet_block{index}", modules, unet_lr * weights[index],
                                            loraplus.for_unet())
        else:
            groups += _lora_plus_groups("unet", unet_modules, unet_lr, loraplus.for_unet())
        groups += _lora_plus_groups("textencoder", text_modules, text_encoder_lr, loraplus.for_text_encoder())
        return groups

    def network_args(self) -> dict[str, str]:
        """``network_args`` that rebuild this network in sd-scripts (``networks.lora``) or LyCORIS."""
        hp = self.hyperparameters
        conv_dim = hp.get("conv_dim")
        given = conv_dim is not None and (conv_dim or self.network_module == "networks.lora")
        args = {key: str(hp[key]) for key in ("conv_dim", "conv_alpha")} if given else {}
        options = hp.get("options")
        changed = changed_options(options) if isinstance(options, AdapterOptions) else {}
        loraplus = hp["loraplus"].network_args() if hp.get("loraplus") else {}
        if self.network_module == "lycoris.kohya":
            shape = {"preset": hp["preset"]} if hp.get("preset", "full") != "full" else {}
            norm = {"train_norm": "True"} if hp.get("train_norm") else {}
            return {"algo": self.algo, **shape, **args, **{key: str(value) for key, value in changed.items()},
                    **norm, **loraplus}
        block_wise = hp["block_wise"].network_args() if hp.get("block_wise") else {}
        return {**args, **{key: str(changed[key]) for key in ("rank_dropout", "module_dropout") if key in changed},
                **block_wise, **loraplus}

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


def _lora_plus_groups(name: str, modules: list[nn.Module], lr: float, ratio: float | None) -> list[dict]:
    """One part's groups: its parameters at ``lr``, and with a LoRA+ ratio its ``lora_up`` weights apart at
    ``lr × ratio`` ("<name> plus"); empty groups and groups at lr 0 are left out, as sd-scripts does."""
    plain, plus = [], []
    for module in modules:
        for parameter_name, parameter in module.named_parameters():
            (plus if ratio is not None and LORAPLUS_MARKER in parameter_name else plain).append(parameter)
    groups = []
    for suffix, parameters, group_lr in (("", plain, lr), (" plus", plus, lr * (ratio or 0.0))):
        if parameters and group_lr:
            groups.append({"params": parameters, "lr": group_lr, "name": name + suffix})
    return groups


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
    preset: str | Preset | None = None,
    train_norm: bool = False,
    block_wise: BlockWise | None = None,
    loraplus: LoraPlus | None = None,
    **algorithm_options: Any,
) -> AdapterNetwork:
    """Wrap the U-Net (and text encoders, when given) in place and return the trainable adapter network.

    ``network_module`` picks the layer set: ``networks.lora`` (sd-scripts: attention blocks, plus ResNet and
    sampler blocks when ``conv_dim`` is given — its kxk convs when it is > 0) or ``lycoris.kohya`` (LyCORIS'
    ``preset``, "full" by default, which also covers the time embedding, ``conv_in`` and ``conv_out``; see
    ``presets``). Like LyCORIS, ``lycoris.kohya`` defaults ``conv_dim`` to ``dim`` and ``conv_alpha`` to ``alpha``;
    ``networks.lora`` keeps kxk convs off unless ``conv_dim`` is given, with ``conv_alpha`` 1 by default, like
    sd-scripts. ``train_norm`` (LyCORIS) adds LayerNorm/GroupNorm offsets; ``block_wise`` (``networks.lora``) sets
    per-block ranks and lr weights; ``loraplus`` speeds up the ``lora_up`` weights (both modules).
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
    text_encoders = text_encoders or []
    hyperparameters = {"dim": dim, "alpha": alpha if alpha else dim, "dropout": options.dropout,
                       "rank_dropout": options.rank_dropout, "module_dropout": options.module_dropout,
                       "options": options, "loraplus": loraplus}
    if network_module == "lycoris.kohya":
        if block_wise is not None:
            raise ValueError("block_dims / *_lr_weight are networks.lora's (sd-scripts); LyCORIS has no block-wise "
                             "ranks")
        if conv_dim is None:
            conv_dim = dim if algorithm.adapts_conv else 0
        conv_alpha = alpha if conv_alpha is None else conv_alpha
        preset = _preset(preset, algorithm)
        adapters = _lycoris_modules(algorithm, options, preset, unet, text_encoders, dim, alpha, conv_dim,
                                    conv_alpha, multiplier, train_norm)
        if not adapters and (unet is not None or text_encoders):
            raise ValueError(f"preset {preset.name} adapts no layer of this model (LyCORIS would train nothing); "
                             "pick another preset or check its target names")
        hyperparameters.update(preset=preset.name, train_norm=bool(train_norm))
    else:
        if preset not in (None, "full") or train_norm:
            raise ValueError("preset and train_norm are LyCORIS' (network_module lycoris.kohya), not networks.lora's")
        lycoris_only = sorted(set(changed_options(options)) - set(KOHYA_OPTIONS))
        if lycoris_only:
            raise ValueError(f"{', '.join(lycoris_only)}: LyCORIS option(s) that sd-scripts' networks.lora does not "
                             "have; use network_module lycoris.kohya (algo=locon for LoRA/LoCon)")
        if conv_dim is not None and conv_alpha is None:
            conv_alpha = 1.0  # sd-scripts' default, whatever network_alpha is
        adapters = _kohya_modules(algorithm, options, unet, text_encoders, dim, alpha, conv_dim, conv_alpha,
                                  multiplier, block_wise)
        if block_wise is not None and unet is not None:
            hyperparameters["block_lr_weights"] = lr_weights(block_wise, is_sdxl_unet(unet))
        hyperparameters["block_wise"] = block_wise
    hyperparameters.update(conv_dim=conv_dim, conv_alpha=conv_alpha)
    network = AdapterNetwork(adapters, algo, network_module, hyperparameters)
    network.apply_to()
    return network


def _preset(preset: str | Preset | None, algorithm: Algorithm) -> Preset:
    from lycolab.networks.args import NetworkArgsError, checked_preset

    try:
        return checked_preset(get_preset(preset), algorithm)
    except (PresetError, NetworkArgsError) as error:
        raise ValueError(str(error)) from None


def _kohya_modules(algorithm: Algorithm, options: AdapterOptions, unet: nn.Module | None,
                   text_encoders: list[nn.Module], dim: int, alpha: float | None, conv_dim: int | None,
                   conv_alpha: float | None, multiplier: float, block_wise: BlockWise | None) -> list[AdapterModule]:
    """sd-scripts' LoRANetwork: text encoders at network_dim; the U-Net at network_dim / conv_dim, or per block."""
    ranks: BlockRanks | None = None
    sdxl = unet is not None and is_sdxl_unet(unet)
    if block_wise is not None and block_wise.active and unet is not None:
        ranks = block_ranks(block_wise, sdxl, dim, alpha, conv_dim, conv_alpha)
    conv_blocks = conv_dim is not None or (ranks is not None and ranks.conv_dims is not None)
    targets = [(target, True) for target in (unet_targets(unet, conv_blocks) if unet is not None else [])]
    targets += [(target, False) for target in text_encoder_targets(text_encoders)]
    adapters = []
    for target, in_unet in targets:
        if in_unet and ranks is not None:
            index = block_index(target.lora_name, sdxl)
            rank, rank_alpha = ((ranks.dims[index], ranks.alphas[index]) if not target.is_conv_kxk else
                                (ranks.conv_dims[index], ranks.conv_alphas[index]) if ranks.conv_dims is not None
                                else (None, None))
        else:
            rank, rank_alpha = (conv_dim, conv_alpha) if target.is_conv_kxk else (dim, alpha)
        if rank:
            adapters.append(algorithm.module_class(target.lora_name, target.module, rank, rank_alpha, multiplier,
                                                   options))
    return adapters


def _lycoris_modules(algorithm: Algorithm, options: AdapterOptions, preset: Preset, unet: nn.Module | None,
                     text_encoders: list[nn.Module], dim: int, alpha: float | None, conv_dim: int,
                     conv_alpha: float | None, multiplier: float, train_norm: bool) -> list[nn.Module]:
    """LycorisNetworkKohya's modules for the preset's layers: norms (with ``train_norm``), then each layer at its
    override's algorithm and rank or the network's (``enable_conv = false`` turns the conv rank off)."""
    conv_rank = conv_dim if preset.enable_conv else 0
    built: dict[int, tuple[Algorithm, AdapterOptions]] = {}
    modules: list[nn.Module] = []
    for target in preset_targets(preset, unet, text_encoders):
        layer = target.module
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            if train_norm and is_trainable_norm(layer):
                modules.append(NormAdapter(target.lora_name, layer, multiplier, options.rank_dropout,
                                           options.module_dropout))
            continue
        override = target.override
        rank, rank_alpha = _lycoris_rank(target, override, dim, alpha, conv_rank, conv_alpha)
        if not rank:
            continue
        if id(override) not in built:
            built[id(override)] = _override_algorithm(algorithm, options, override)
        module_algorithm, module_options = built[id(override)]
        modules.append(module_algorithm.module_class(target.lora_name, layer, rank, rank_alpha, multiplier,
                                                     module_options))
    return modules


def _lycoris_rank(target: PresetTarget, override: ModuleOverride, dim: int, alpha: float | None, conv_rank: int,
                  conv_alpha: float | None) -> tuple[int | None, float | None]:
    """LyCORIS' rule: Linear and 1x1 convs take network_dim (unless 0), kxk convs conv_dim; an override's dim and
    alpha win where set (a dim even turns on a kxk conv whose conv rank is off)."""
    if not target.is_conv_kxk and dim > 0:
        return override.dim or dim, override.alpha or alpha
    if target.is_conv_kxk and (conv_rank > 0 or override.dim):
        return override.dim or conv_rank, override.alpha or conv_alpha
    return None, None


def _override_algorithm(algorithm: Algorithm, options: AdapterOptions, override: ModuleOverride
                        ) -> tuple[Algorithm, AdapterOptions]:
    """The algorithm and options for an override's modules: the network's options the algorithm also has (LyCORIS
    passes its network arguments to every module), then the override's own."""
    if override.algo is None and not override.options:
        return algorithm, options
    chosen = get_algorithm(override.algo) if override.algo else algorithm
    names = option_types(chosen.options_class)
    carried = {key: value for key, value in changed_options(options).items() if key in names}
    return chosen, make_options(chosen.options_class, **{**carried, **override.options})


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
