"""LyCORIS presets (``network_args preset=...``): which layers a ``lycoris.kohya`` network adapts, and how.

A preset is LyCORIS' builtin name (``full``, ``full-lin``, ``attn-mlp``, ``attn-only``, ``unet-only``,
``unet-transformer-only``, ``unet-convblock-only``, ``ia3``) or a TOML file as LyCORIS' ``read_preset`` reads it. The
layers are found the way ``LycorisNetworkKohya`` finds them under sd-scripts:

- every module whose *class* is in ``unet_target_module`` / ``text_encoder_target_module`` (and whose path matches
  no target name) is a block: its Linear/Conv2d layers are adapted (inside it, a module whose class is in
  ``module_algo_map`` is a block of its own, with that override);
- every module whose *path* equals or matches (``re.match``, i.e. from the start; ``fnmatch`` with ``use_fnmatch``) a
  ``*_target_name`` is adapted itself, with the ``name_algo_map`` override of the first matching key, else its class's
  ``module_algo_map`` one;
- paths matching ``exclude_name`` are skipped; ``enable_conv = false`` leaves kxk convs out.

Class names and paths are those of sd-scripts' model: a diffusers ``Attention`` is its ``CrossAttention``, and an
SDXL U-Net has its original-layout paths and no ``TimestepEmbedding`` (see ``naming``). Two differences from 4.1.3,
both where it fails: a layer reached twice (``full`` names the time embedding's linears and lists
``TimestepEmbedding``) is adapted once instead of stopping with "duplicated lora name"; and the builtin lists name
only the classes that exist in SD 1.x/2.x/SDXL (LyCORIS' also name Flux, SD3, HunyuanDiT... blocks, which match
nothing here). LyCORIS' ``ia3`` preset names ``to_k``/``k_proj``..., which ``re.match`` finds at no path start: it
adapts nothing in 4.1.3 (nor here, which is then an error). ``lora_prefix``, ``target_module`` and ``target_name``
are read by LyCORIS' plain wrapper only, not under kohya: they are accepted and ignored, with a warning.

An override (``module_algo_map`` / ``name_algo_map`` entry) may set ``algo``, ``dim``, ``alpha`` and any option of
that algorithm (``use_tucker``, ``factor``...); options it does not know are ignored with a warning, as LyCORIS'
modules ignore them.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib
from torch import nn

from lycolab.models.detect import is_sdxl_unet
from lycolab.networks.naming import (
    UNET_PREFIX,
    canonical_named_modules,
    lora_name,
    sd_scripts_class_name,
    text_encoder_prefix,
)

logger = logging.getLogger(__name__)

# The blocks of SD 1.x/2.x/SDXL among LyCORIS 4.1.3's lists (TimestepEmbedding is there for Anima)
UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding")
UNET_LINEAR_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "TimestepEmbedding")
UNET_TRANSFORMER_BLOCKS = ("Transformer2DModel", "TimestepEmbedding")
UNET_EXTRA_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
PRESET_KEYS = ("enable_conv", "target_module", "target_name", "module_algo_map", "name_algo_map", "lora_prefix",
               "use_fnmatch", "unet_target_module", "unet_target_name", "text_encoder_target_module",
               "text_encoder_target_name", "exclude_name")
IGNORED_KEYS = ("target_module", "target_name", "lora_prefix")  # LyCORIS' plain wrapper's, not read under kohya
OVERRIDE_SHAPE_KEYS = ("algo", "dim", "alpha")


class PresetError(ValueError):
    """A preset that cannot be used; the message names the preset and the key."""


@dataclass(frozen=True)
class ModuleOverride:
    """A preset's algorithm / rank / options for some modules (``module_algo_map`` or ``name_algo_map`` entry)."""

    algo: str | None = None
    dim: int | None = None
    alpha: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


NO_OVERRIDE = ModuleOverride()


@dataclass(frozen=True)
class Preset:
    """Which modules a ``lycoris.kohya`` network adapts. Unset keys keep LyCORIS' defaults, its "full" preset."""

    name: str = "full"  # the builtin name or the file path, as ``network_args`` give it
    enable_conv: bool = True
    unet_target_module: tuple[str, ...] = UNET_BLOCKS
    unet_target_name: tuple[str, ...] = UNET_EXTRA_NAMES
    text_encoder_target_module: tuple[str, ...] = TEXT_ENCODER_BLOCKS
    text_encoder_target_name: tuple[str, ...] = ()
    module_algo_map: Mapping[str, ModuleOverride] = field(default_factory=dict)
    name_algo_map: Mapping[str, ModuleOverride] = field(default_factory=dict)
    use_fnmatch: bool = False
    exclude_name: tuple[str, ...] = ()

    def overrides(self) -> list[tuple[str, ModuleOverride]]:
        """Every override with where it comes from ("module_algo_map.Transformer2DModel")."""
        return [*((f"module_algo_map.{key}", value) for key, value in self.module_algo_map.items()),
                *((f"name_algo_map.{key}", value) for key, value in self.name_algo_map.items())]

    def matches(self, pattern: str, path: str) -> bool:
        if self.use_fnmatch:
            return fnmatch.fnmatch(path, pattern)
        return re.match(pattern, path) is not None

    def is_excluded(self, path: str) -> bool:
        return bool(path) and (path in self.exclude_name or any(self.matches(t, path) for t in self.exclude_name))

    def is_named(self, path: str, names: tuple[str, ...]) -> bool:
        return path in names or any(self.matches(pattern, path) for pattern in names)

    def name_override(self, path: str) -> ModuleOverride | None:
        if path in self.name_algo_map:
            return self.name_algo_map[path]
        return next((value for key, value in self.name_algo_map.items() if self.matches(key, path)), None)


BUILTIN_PRESETS = {
    "full": Preset("full"),
    "full-lin": Preset("full-lin", enable_conv=False, unet_target_module=UNET_LINEAR_BLOCKS,
                       unet_target_name=UNET_EXTRA_NAMES[2:]),
    "attn-mlp": Preset("attn-mlp", enable_conv=False, unet_target_module=UNET_TRANSFORMER_BLOCKS,
                       unet_target_name=()),
    "attn-only": Preset("attn-only", enable_conv=False, unet_target_module=("CrossAttention", "SelfAttention"),
                        unet_target_name=(), text_encoder_target_module=("CLIPAttention", "CLIPSdpaAttention")),
    "unet-only": Preset("unet-only", text_encoder_target_module=()),
    "unet-transformer-only": Preset("unet-transformer-only", enable_conv=False,
                                    unet_target_module=UNET_TRANSFORMER_BLOCKS, unet_target_name=(),
                                    text_encoder_target_module=()),
    "unet-convblock-only": Preset("unet-convblock-only", unet_target_module=UNET_BLOCKS[1:4],
                                  unet_target_name=UNET_EXTRA_NAMES[:2], text_encoder_target_module=()),
    "ia3": Preset("ia3", enable_conv=False, unet_target_module=(), unet_target_name=("to_k", "to_v", "ff.net.2"),
                  text_encoder_target_module=(), text_encoder_target_name=("k_proj", "v_proj", "mlp.fc2"),
                  name_algo_map={"mlp.fc2": ModuleOverride(options={"train_on_input": True}),
                                 "ff.net.2": ModuleOverride(options={"train_on_input": True})}),
}


def get_preset(value: str | Preset | None) -> Preset:
    """A builtin preset by name, or a preset file (``.toml``) by path; raises :class:`PresetError`."""
    if isinstance(value, Preset):
        return value
    text = "full" if value is None else str(value).strip()
    if text in BUILTIN_PRESETS:
        return BUILTIN_PRESETS[text]
    path = Path(text).expanduser()
    if path.suffix.lower() != ".toml" and not path.is_file():
        raise PresetError(f"network_args preset {text!r} is neither a LyCORIS preset ({', '.join(BUILTIN_PRESETS)}) "
                          "nor a .toml preset file")
    return read_preset_file(path, text)


def read_preset_file(path: str | Path, name: str | None = None) -> Preset:
    """A LyCORIS preset file: its keys as ``read_preset`` accepts them, checked here with one-line errors."""
    path = Path(path)
    name = str(path) if name is None else name
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PresetError(f"network_args preset {name}: file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PresetError(f"network_args preset {name}: not a readable TOML file ({message})") from None
    return preset_from_dict(data, name)


def preset_from_dict(data: Mapping[str, Any], name: str) -> Preset:
    """A :class:`Preset` from LyCORIS' preset keys; missing keys keep the "full" preset's values, as in LyCORIS."""
    unknown = sorted(key for key in data if key not in PRESET_KEYS)
    if unknown:
        raise PresetError(f"preset {name}: unknown key(s) {', '.join(unknown)}; LyCORIS reads {', '.join(PRESET_KEYS)}")
    ignored = [key for key in IGNORED_KEYS if key in data]
    if ignored:
        logger.warning("preset %s: %s not read by lycoris.kohya (LyCORIS' kohya network reads the unet_/"
                       "text_encoder_ keys)", name, ", ".join(ignored))
    values: dict[str, Any] = {"name": name}
    for key in ("enable_conv", "use_fnmatch"):
        if key in data:
            if not isinstance(data[key], bool):
                raise PresetError(f"preset {name}: {key} must be true or false (got {data[key]!r})")
            values[key] = data[key]
    for key in ("unet_target_module", "unet_target_name", "text_encoder_target_module", "text_encoder_target_name",
                "exclude_name"):
        if key in data:
            values[key] = _strings(data[key], name, key)
    for key in ("module_algo_map", "name_algo_map"):
        if key in data:
            values[key] = _overrides(data[key], name, key)
    preset = Preset(**values)
    if not preset.use_fnmatch:
        patterns = {key: getattr(preset, key) for key in ("unet_target_name", "text_encoder_target_name",
                                                          "exclude_name")}
        patterns["name_algo_map"] = tuple(preset.name_algo_map)
        for key, values in patterns.items():
            for pattern in values:
                _check_pattern(pattern, name, key)
    return preset


def with_options(preset: Preset, check: Any) -> Preset:
    """``preset`` with each override's options passed through ``check(where, algo, options) -> options``: typing
    and filtering them is the network arguments' job (``networks.args``), which knows the algorithms."""
    def checked(prefix: str, overrides: Mapping[str, ModuleOverride]) -> dict[str, ModuleOverride]:
        return {key: replace(value, options=check(f"preset {preset.name}: {prefix}.{key}", value.algo, value.options))
                for key, value in overrides.items()}

    return replace(preset, module_algo_map=checked("module_algo_map", preset.module_algo_map),
                   name_algo_map=checked("name_algo_map", preset.name_algo_map))


def _strings(value: Any, name: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PresetError(f"preset {name}: {key} must be a list of strings (got {value!r})")
    return tuple(value)


def _check_pattern(pattern: str, name: str, key: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise PresetError(f"preset {name}: {key} {pattern!r} is not a regular expression ({error})") from None


def _overrides(value: Any, name: str, key: str) -> dict[str, ModuleOverride]:
    if not isinstance(value, Mapping):
        raise PresetError(f"preset {name}: {key} must be a table of tables (got {value!r})")
    overrides = {}
    for target, settings in value.items():
        settings = dict(settings or {})
        if not isinstance(settings, dict):
            raise PresetError(f"preset {name}: {key}.{target} must be a table")
        algo, dim, alpha = settings.pop("algo", None), settings.pop("dim", None), settings.pop("alpha", None)
        if algo is not None and not isinstance(algo, str):
            raise PresetError(f"preset {name}: {key}.{target}.algo must be a string (got {algo!r})")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 0):
            raise PresetError(f"preset {name}: {key}.{target}.dim must be a whole number >= 0 (got {dim!r})")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float)):
            raise PresetError(f"preset {name}: {key}.{target}.alpha must be a number (got {alpha!r})")
        overrides[target] = ModuleOverride(algo=None if algo is None else algo.strip().lower(), dim=dim or None,
                                           alpha=None if alpha is None else float(alpha) or None, options=settings)
    return overrides


# ------------------------------------------------------------------------------------------------ finding layers


@dataclass(frozen=True)
class PresetTarget:
    """A layer the preset adapts, with its file name and the override that applies to it (if any)."""

    lora_name: str
    module: nn.Module
    override: ModuleOverride

    @property
    def is_conv_kxk(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def preset_targets(preset: Preset, unet: nn.Module | None, text_encoders: list[nn.Module]) -> list[PresetTarget]:
    """Every layer (Linear, Conv2d, and the norms ``train_norm`` may adapt) the preset reaches, once each, in the
    model's module order: U-Net first, then each text encoder."""
    roots = [(UNET_PREFIX, unet, preset.unet_target_module, preset.unet_target_name)] if unet is not None else []
    roots += [(text_encoder_prefix(index, len(text_encoders)), encoder, preset.text_encoder_target_module,
               preset.text_encoder_target_name) for index, encoder in enumerate(text_encoders)]
    targets: list[PresetTarget] = []
    for prefix, root, blocks, names in roots:
        targets += _Walk(preset, root, prefix).run(blocks, names)
    return targets


class _Walk:
    """One root (U-Net or a text encoder) walked as LycorisNetworkKohya walks it."""

    def __init__(self, preset: Preset, root: nn.Module, prefix: str):
        self.preset, self.prefix = preset, prefix
        self.sdxl = is_sdxl_unet(root)
        self.paths = {id(module): path for path, module in canonical_named_modules(root)}
        self.root = root
        self.found: dict[str, PresetTarget] = {}

    def class_name(self, module: nn.Module) -> str | None:
        return sd_scripts_class_name(module, self.paths[id(module)], self.sdxl)

    def run(self, blocks: tuple[str, ...], names: tuple[str, ...]) -> list[PresetTarget]:
        preset = self.preset
        for path, module in canonical_named_modules(self.root):
            if preset.is_excluded(path):
                continue
            class_name = self.class_name(module)
            named = any(preset.matches(pattern, path) for pattern in names)
            if class_name in blocks and not named:
                self.block(module, preset.module_algo_map.get(class_name, NO_OVERRIDE))
            elif named or path in names:
                override = preset.name_override(path) or preset.module_algo_map.get(class_name, NO_OVERRIDE)
                self.add(module, override)
        return list(self.found.values())

    def block(self, block: nn.Module, override: ModuleOverride) -> None:
        """Every layer inside ``block`` (itself included); a nested ``module_algo_map`` class is a block of its own,
        whose override inherits this one's algo."""
        for module in block.modules():
            if self.preset.is_excluded(self.paths[id(module)]):
                continue
            inner = self.preset.module_algo_map.get(self.class_name(module))
            if inner is not None and module is not block:
                self.block(module, replace(inner, algo=inner.algo or override.algo))
                continue
            self.add(module, override)

    def add(self, module: nn.Module, override: ModuleOverride) -> None:
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)):
            return
        name = lora_name(self.prefix, self.paths[id(module)])
        self.found.setdefault(name, PresetTarget(name, module, override))
