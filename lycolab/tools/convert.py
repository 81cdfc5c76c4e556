"""LoRA/LoCon files between kohya/LyCORIS keys and the PEFT/diffusers layout ``save_lora_weights`` writes.

kohya names a module ``lora_unet_down_blocks_0_..._to_q`` and holds ``lora_down.weight``, ``lora_up.weight`` and
``alpha`` (ΔW = up·down·alpha/rank). diffusers names it ``unet.down_blocks.0....to_q`` and holds ``lora_A.weight`` /
``lora_B.weight`` with ΔW = B·A·lora_alpha/r, where a file without ``lora_adapter_metadata`` means lora_alpha = r
(scale 1). So the PEFT file we write folds alpha/rank into ``lora_B``: every diffusers version, ComfyUI and plain
PEFT then read the same ΔW without knowing about alphas. The kohya alphas also go into the metadata
(:data:`KOHYA_ALPHAS_KEY`), so converting back restores the original factors (up to float32 rounding of the fold).
A PEFT file from diffusers' own training scripts carries its LoraConfig in ``lora_adapter_metadata``
(``lora_alpha``, ``alpha_pattern``, ``rank_pattern``, ``use_rslora``); its scale becomes the kohya alpha.

SDXL: kohya files name U-Net layers by the original (SGM) layout (``input_blocks_4_1_...``) and the text encoders
``lora_te1_``/``lora_te2_``; diffusers uses its own layout and ``text_encoder``/``text_encoder_2``. The block
mapping is the one the checkpoint export uses, for SDXL's block pattern. Only LoRA/LoCon have a PEFT LoRA form:
other algorithms (LoHa, LoKr, …), Tucker-split convs and DoRA are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from lycolab.display import ShownAsTable, Table
from lycolab.networks.io import (
    AdapterFileError,
    group_by_module,
    read_adapter_file,
    save_adapter_file,
    unsupported_algorithm,
)
from lycolab.networks.registry import algorithm_of_module

KOHYA, PEFT = "kohya", "peft"
TARGETS = {"kohya": KOHYA, "peft": PEFT, "diffusers": PEFT}
SD, SDXL = "sd", "sdxl"
KOHYA_ALPHAS_KEY = "lycolab_kohya_alphas"  # in a PEFT file we wrote: {peft module name: kohya alpha}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig per component, flattened with prefixes
# kohya prefix → diffusers component, per family (SD 1.x/2.x has one text encoder, SDXL two)
COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
              "lora_te2": "text_encoder_2"}
# The factor names of PEFT files, and of the "diffusers" variant its training scripts write for text encoders
# (``convert_state_dict_to_diffusers``: ``lora_linear_layer.down``) and older U-Net files (``lora.down``)
PEFT_FACTORS = {"lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight",
                "lora_linear_layer.down.weight": "lora_A.weight", "lora_linear_layer.up.weight": "lora_B.weight",
                "lora.down.weight": "lora_A.weight", "lora.up.weight": "lora_B.weight"}
_PEFT_KEY = re.compile(r"(.+?)\.(" + "|".join(re.escape(name) for name in PEFT_FACTORS) + ")")
# Module-path segments that hold an underscore (diffusers U-Net, SGM U-Net, CLIP): a kohya name is the path with
# every dot turned into an underscore, so these tell which underscores were dots.
MULTI_WORD_SEGMENTS = frozenset((
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v",
    "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "class_embedding", "input_blocks", "middle_block", "output_blocks",
    "in_layers", "out_layers", "emb_layers", "skip_connection", "label_emb", "time_embed", "text_model",
    "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2", "final_layer_norm",
    "token_embedding", "position_embedding", "text_projection"))
# SDXL's U-Net block pattern (what unet_block_map reads): 3 levels of 2 layers, the last up level without attention
SDXL_BLOCKS = SimpleNamespace(layers_per_block=2, block_out_channels=(320, 640, 1280),
                              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "label_emb", "time_embed", "out")


@dataclass
class ConvertReport(ShownAsTable):
    """What a conversion wrote: the layouts, the modules per component, and notes on alphas."""

    source: Path
    out: Path
    source_layout: str
    target_layout: str
    family: str
    modules: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def table(self) -> Table:
        rows = [{"": "source", "value": f"{self.source} ({self.source_layout})"},
                {"": "written", "value": f"{self.out} ({self.target_layout})"},
                {"": "model family", "value": "SDXL" if self.family == SDXL else "SD 1.x/2.x"}]
        rows += [{"": f"{component} modules", "value": count} for component, count in self.modules.items()]
        return Table(rows, title="converted", notes=self.notes)


def convert_adapter(source: str | Path, out: str | Path, to: str, family: str | None = None) -> ConvertReport:
    """Write ``source`` (kohya/LyCORIS or PEFT/diffusers LoRA) to ``out`` in layout ``to`` ("kohya", "peft" or its
    synonym "diffusers"). ``family`` ("sd" or "sdxl") is read off the names when not given."""
    target = TARGETS.get(str(to).strip().lower())
    if target is None:
        raise ValueError(f"convert to {to!r}? choose one of {', '.join(TARGETS)}")
    source, out = Path(source), Path(out)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"{out}: the converted file must end in .safetensors")
    tensors, metadata = read_adapter_file(source)
    layout = file_layout(tensors)
    if layout is None:
        raise AdapterFileError(f"{source}: neither kohya/LyCORIS (lora_unet_…, lora_te…) nor PEFT/diffusers "
                               "(unet.….lora_A.weight) keys; is it an adapter file?")
    if layout == target:
        raise ValueError(f"{source}: already in the {target} layout; nothing to convert")
    if target == PEFT:
        converted, new_metadata, family, notes = kohya_to_peft(source, tensors, metadata)
    else:
        converted, new_metadata, family, notes = peft_to_kohya(source, tensors, metadata, family)
    if source.resolve() == out.resolve():
        raise ValueError(f"{out}: the same file as the source; choose another output name")
    save_adapter_file(converted, out, new_metadata)
    modules = Counter(key.split(".")[0] if target == PEFT else key.split("_")[1] for key in converted
                      if key.endswith(("lora_A.weight", "lora_down.weight")))
    modules = {_component_title(name): count for name, count in sorted(modules.items())}
    return ConvertReport(source, out, layout, target, family, modules, notes)


def file_layout(tensors: dict[str, torch.Tensor]) -> str | None:
    """"kohya" (``lora_unet_…``/``lora_te…`` modules), "peft" (``….lora_A.weight``) or None."""
    keys = list(tensors)
    if keys and all(key.split(".")[0].split("_")[0] == "lora" and "_" in key.split(".")[0] for key in keys):
        return KOHYA
    if any(_PEFT_KEY.fullmatch(key) for key in keys):
        return PEFT
    return None


def _component_title(name: str) -> str:
    return {"unet": "U-Net", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2", "te": "text encoder",
            "te1": "text encoder", "te2": "text encoder 2"}.get(name, name)


# ---- kohya → PEFT


def kohya_to_peft(source: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str], str, list[str]]:
    """PEFT tensors with alpha/rank folded into ``lora_B``, the metadata to write, the family, notes."""
    converted: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    family = SD
    for lora_name, parameters in group_by_module(tensors).items():
        _check_convertible(source, lora_name, parameters)
        prefix, component, path = split_kohya_name(source, lora_name)
        if prefix in ("lora_te1", "lora_te2") or path != dotted_path(lora_name[len(prefix) + 1:]):
            family = SDXL  # two text encoders, or SGM-layout U-Net names
        down, up = parameters["lora_down.weight"], parameters["lora_up.weight"]
        rank = down.shape[0]
        alpha = float(parameters["alpha"]) if "alpha" in parameters else float(rank)
        peft_name = f"{component}.{path}"
        converted[f"{peft_name}.lora_A.weight"] = down
        converted[f"{peft_name}.lora_B.weight"] = (up.float() * (alpha / rank)).to(up.dtype)
        alphas[peft_name] = alpha
    kept = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    new_metadata = {**kept, "format": "pt", KOHYA_ALPHAS_KEY: json.dumps(alphas, sort_keys=True)}
    notes = ["alpha/rank is folded into lora_B (diffusers reads the file with scale 1); the kohya alphas are kept in "
             f"the metadata ({KOHYA_ALPHAS_KEY}) for the way back"]
    return converted, new_metadata, family, notes


def _check_convertible(source: Path, lora_name: str, parameters: dict[str, torch.Tensor]) -> None:
    """Only plain LoRA/LoCon modules have a PEFT LoRA form; anything else is refused by name, in one line."""
    algorithm = algorithm_of_module(parameters)
    if algorithm is None or algorithm.name != "lora":
        name = algorithm.title if algorithm is not None else unsupported_algorithm(parameters) or "unknown"
        raise AdapterFileError(f"{source}: {lora_name} is a {name} module; only LoRA/LoCon files convert to the "
                               "PEFT/diffusers layout (A1111, ComfyUI and lycolab read this file as it is)")
    if "lora_mid.weight" in parameters:
        raise AdapterFileError(f"{source}: {lora_name} is a Tucker-split LoCon conv (lora_mid), which PEFT LoRA "
                               "cannot hold; only plain LoRA/LoCon modules convert")
    if "dora_scale" in parameters:
        raise AdapterFileError(f"{source}: {lora_name} uses DoRA (dora_scale), which diffusers does not load; "
                               "only plain LoRA/LoCon modules convert")
    if "lora_up.weight" not in parameters:
        raise AdapterFileError(f"{source}: {lora_name} has lora_down.weight but no lora_up.weight; re-download "
                               "or re-save the file")


def split_kohya_name(source: Path, lora_name: str) -> tuple[str, str, str]:
    """``lora_unet_input_blocks_4_1_proj_in`` → ("lora_unet", "unet", "down_blocks.1.attentions.0.proj_in"): the
    prefix, the diffusers component and the diffusers module path (SGM names mapped to the diffusers layout)."""
    for prefix in sorted(COMPONENTS, key=len, reverse=True):
        if lora_name.startswith(prefix + "_"):
            path = dotted_path(lora_name[len(prefix) + 1:])
            if prefix == "lora_unet" and path.split(".")[0] in SGM_ROOTS:
                path = sgm_to_diffusers(source, lora_name, path)
            return prefix, COMPONENTS[prefix], path
    raise AdapterFileError(f"{source}: {lora_name} is neither a U-Net (lora_unet_) nor a text-encoder (lora_te_, "
                           "lora_te1_, lora_te2_) module")


def dotted_path(kohya_suffix: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` → ``down_blocks.0.attentions.0.…attn1.to_q``:
    the longest known multi-word segment at each place, else one word."""
    words = kohya_suffix.split("_")
    segments, index = [], 0
    while index < len(words):
        end = next((end for end in range(len(words), index + 1, -1)
                    if "_".join(words[index:end]) in MULTI_WORD_SEGMENTS), index + 1)
        segments.append("_".join(words[index:end]))
        index = end
    return ".".join(segments)


# ---- SDXL: the SGM (original) U-Net layout ↔ diffusers'


def _sdxl_blocks() -> list[tuple[str, str, str]]:
    from lycolab.models.export import unet_block_map

    return unet_block_map(SDXL_BLOCKS)


def diffusers_to_sgm(path: str) -> str:
    """``down_blocks.1.attentions.0.proj_in`` → ``input_blocks.4.1.proj_in`` for SDXL's block pattern (a path
    outside every block, such as ``add_embedding.linear_1``, maps by :data:`naming.SDXL_EXTRA_PATHS`)."""
    from lycolab.models.export import UNET_RESNET_NAMES
    from lycolab.networks.naming import SDXL_EXTRA_PATHS

    extra = dict(SDXL_EXTRA_PATHS)
    if path in extra:
        return extra[path]
    for diffusers_prefix, sgm_prefix, kind in _sdxl_blocks():
        if (path + ".").startswith(diffusers_prefix):
            rest = (path + ".")[len(diffusers_prefix):]
            for diffusers_name, sgm_name in UNET_RESNET_NAMES if kind == "resnet" else ():
                if rest.startswith(diffusers_name + "."):
                    rest = sgm_name + rest[len(diffusers_name):]
                    break
            return (sgm_prefix + rest).rstrip(".")
    return path


def sgm_to_diffusers(source: Path, lora_name: str, path: str) -> str:
    """The inverse of :func:`diffusers_to_sgm`; a path in no SDXL block is refused (not an SDXL U-Net name)."""
    from lycolab.models.export import UNET_RESNET_NAMES
    from lycolab.networks.naming import SDXL_EXTRA_PATHS

    extra = {sgm: diffusers for diffusers, sgm in SDXL_EXTRA_PATHS}
    if path in extra:
        return extra[path]
    for diffusers_prefix, sgm_prefix, kind in _sdxl_blocks():
        if (path + ".").startswith(sgm_prefix):
            rest = (path + ".")[len(sgm_prefix):]
            for diffusers_name, sgm_name in UNET_RESNET_NAMES if kind == "resnet" else ():
                if rest.startswith(sgm_name + "."):
                    rest = diffusers_name + rest[len(sgm_name):]
                    break
            return (diffusers_prefix + rest).rstrip(".")
    raise AdapterFileError(f"{source}: {lora_name} names no layer of an SDXL U-Net ({path})")


# ---- PEFT → kohya


def peft_to_kohya(source: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  family: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str], str, list[str]]:
    """kohya tensors with an ``alpha`` per module (ΔW unchanged), the metadata to write, the family, notes."""
    modules = _peft_modules(source, tensors)
    family = family or peft_family(modules)
    if family not in (SD, SDXL):
        raise ValueError(f"family {family!r}? use sd or sdxl")
    kohya_alphas = json_object(metadata.get(KOHYA_ALPHAS_KEY))
    config = json_object(metadata.get(DIFFUSERS_METADATA_KEY))
    converted: dict[str, torch.Tensor] = {}
    ranks, alphas, conv = Counter(), Counter(), []
    for peft_name, parameters in modules.items():
        down, up = parameters["lora_A.weight"], parameters["lora_B.weight"]
        rank = down.shape[0]
        if isinstance(kohya_alphas.get(peft_name), (int, float)):  # our own file: unfold alpha/rank from lora_B
            alpha = float(kohya_alphas[peft_name])
            up = (up.float() / (alpha / rank)).to(up.dtype)
        else:  # diffusers' scale lora_alpha / r (or / sqrt(r) with rsLoRA) becomes alpha / rank
            alpha = peft_module_scale(source, peft_name, rank, config) * rank
        lora_name = kohya_name(peft_name, family)
        converted[f"{lora_name}.lora_down.weight"] = down
        converted[f"{lora_name}.lora_up.weight"] = up
        converted[f"{lora_name}.alpha"] = torch.tensor(alpha)
        if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
            conv.append((rank, alpha))
        else:
            ranks[rank] += 1
            alphas[alpha] += 1
    new_metadata = _kohya_metadata(metadata, ranks, alphas, conv, family)
    notes = [] if kohya_alphas else ["alpha = the PEFT scale × rank per module (ΔW unchanged)"]
    return converted, new_metadata, family, notes


def _peft_modules(source: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"unet.down_blocks…to_q": {"lora_A.weight": …, "lora_B.weight": …}}``; what kohya cannot hold is refused."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            reason = ("DoRA (lora_magnitude_vector), which kohya LoRA files cannot hold" if "lora_magnitude" in key
                      else "a LoRA bias (lora_B.bias), which kohya LoRA files cannot hold" if key.endswith(".bias")
                      else "a key that is not lora_A.weight / lora_B.weight")
            raise AdapterFileError(f"{source}: {key} is {reason}; only plain LoRA files convert")
        component = match.group(1).split(".")[0]
        if component not in ("unet", "text_encoder", "text_encoder_2"):
            raise AdapterFileError(f"{source}: {key} belongs to no U-Net or text encoder (unet., text_encoder., "
                                   "text_encoder_2.); only Stable Diffusion LoRAs convert")
        modules.setdefault(match.group(1), {})[PEFT_FACTORS[match.group(2)]] = tensor
    for name, parameters in modules.items():
        if len(parameters) != 2:
            raise AdapterFileError(f"{source}: {name} lacks lora_A or lora_B; re-download or re-save the file")
    return modules


def peft_family(modules: dict[str, dict[str, torch.Tensor]]) -> str:
    """SDXL when a second text encoder or the added-conditioning MLP is there, or when the U-Net's attention sits
    below its first level (SD 1.x/2.x always have attention in ``down_blocks.0``, SDXL never)."""
    names = list(modules)
    if any(name.startswith(("text_encoder_2.", "unet.add_embedding.")) for name in names):
        return SDXL
    attention = [name for name in names if name.startswith("unet.down_blocks.") and ".attentions." in name]
    if attention and not any(name.startswith("unet.down_blocks.0.") for name in attention):
        return SDXL
    return SD


def kohya_name(peft_name: str, family: str) -> str:
    """``unet.down_blocks.1.attentions.0.proj_in`` → ``lora_unet_down_blocks_1_attentions_0_proj_in`` (SD) or
    ``lora_unet_input_blocks_4_1_proj_in`` (SDXL); text encoders keep the ``text_model`` level files use."""
    component, _, path = peft_name.partition(".")
    if component == "unet":
        prefix = "lora_unet"
        path = diffusers_to_sgm(path) if family == SDXL else path
    else:
        prefix = ("lora_te2" if component == "text_encoder_2" else "lora_te1") if family == SDXL else "lora_te"
        path = path if path.startswith("text_model.") else f"text_model.{path}"
    return f"{prefix}.{path}".replace(".", "_")


def peft_module_scale(source: Path, peft_name: str, rank: int, config: dict) -> float:
    """ΔW's scale for one module (``unet.…to_q``) under diffusers' LoraConfig metadata ``config`` (the parsed
    ``lora_adapter_metadata``; none: lora_alpha = r, scale 1)."""
    component, _, module = peft_name.partition(".")
    values = {key[len(component) + 1:]: value for key, value in config.items() if key.startswith(component + ".")}
    if not values:
        return 1.0
    if values.get("use_dora"):
        raise AdapterFileError(f"{source}: the LoraConfig uses DoRA, which kohya LoRA files cannot hold")
    alpha = _pattern_value(values.get("alpha_pattern"), module, values.get("lora_alpha", rank))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return 1.0
    return float(alpha) / (math.sqrt(rank) if values.get("use_rslora") else rank)


def _pattern_value(patterns, module: str, default):
    """peft's rank/alpha pattern lookup (``peft.utils.other.get_pattern_key``): the first key matching the end of
    the module path after a dot (``^`` anchors it at the start)."""
    for key, value in (patterns or {}).items() if isinstance(patterns, dict) else ():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return default


def json_object(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _kohya_metadata(metadata: dict[str, str], ranks: Counter, alphas: Counter, conv: list[tuple[int, float]],
                    family: str) -> dict[str, str]:
    """The source's ``ss_*`` keys when it has them (a file we converted); else what sd-scripts' ``networks.lora``
    writes for a LoRA of these ranks, so A1111 and ComfyUI describe it correctly."""
    kept = {key: value for key, value in metadata.items()
            if key not in ("format", KOHYA_ALPHAS_KEY, DIFFUSERS_METADATA_KEY) and not key.startswith("sshs_")}
    if "ss_network_module" in kept:
        return kept
    dim = ranks.most_common(1)[0][0] if ranks else (conv[0][0] if conv else 0)
    alpha = alphas.most_common(1)[0][0] if alphas else (conv[0][1] if conv else 0)
    args = {"conv_dim": str(Counter(r for r, _ in conv).most_common(1)[0][0]),
            "conv_alpha": str(Counter(a for _, a in conv).most_common(1)[0][0])} if conv else {}
    kept.update({"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
                 "ss_network_args": json.dumps(args)})
    if family == SDXL:
        kept.setdefault("ss_base_model_version", "sdxl_base_v1-0")
    return kept
