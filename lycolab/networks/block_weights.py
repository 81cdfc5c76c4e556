"""kohya's block-wise ranks and learning rates (``networks.lora``'s ``block_dims`` … ``up_lr_weight``).

sd-scripts numbers the U-Net's blocks by the SD checkpoint layout: for SD 1.x/2.x 25 of them — 0 (nothing there),
down 1–11 (``3·i + j + 1`` for ``down_blocks.i.{resnets,attentions}.j``, ``3·i + 3`` for its downsampler), mid 12,
up 13–24 (the same rule from 13) — and for SDXL 23, by sd-scripts' own names: 0 the time/label embeddings,
``input_blocks.n`` → 1 + n, ``middle_block.n`` → 10 + n, ``output_blocks.n`` → 13 + n, ``out`` → 22.

``block_dims`` / ``block_alphas`` (and ``conv_…`` for kxk convs) give each block its rank; a rank of 0 leaves the
block's layers out. ``down/mid/up_lr_weight`` multiply the U-Net learning rate per block (a comma list, or for down
and up a shape: ``cosine``, ``sine``, ``linear``, ``reverse_linear``, ``zeros``, optionally ``+base``); a weight of at
most ``block_lr_zero_threshold`` is 0, and a block with weight 0 is not trained at all (its layers are left out, as
its rank were 0). Lists that are too short are filled with 1, too long cut, as sd-scripts does (with a warning).
The text encoders keep ``network_dim`` and their own learning rate. Only the rules are taken from sd-scripts'
``networks/lora.py``; where it crashes or silently ignores a value (a single number as ``down_lr_weight``), this is
a one-line error naming the key.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SD_DOWN_OR_UP, SD_MID = 12, 1  # blocks per side / in the middle, SD 1.x/2.x
SDXL_DOWN_OR_UP, SDXL_MID = 9, 3
SD_BLOCKS = 2 * SD_DOWN_OR_UP + SD_MID  # 25 (index 0 holds no layer)
SDXL_BLOCKS = 1 + 2 * SDXL_DOWN_OR_UP + SDXL_MID + 1  # 23: embeddings, input, middle, output, out
LR_WEIGHT_SHAPES = ("cosine", "sine", "linear", "reverse_linear", "zeros")
DIFFUSERS_BLOCK = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
        "up_lr_weight", "block_lr_zero_threshold")


class BlockWiseError(ValueError):
    """A block-wise value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class BlockWise:
    """The block-wise ``network_args`` of one network, parsed but not yet fitted to a model family.

    ``down_lr_weight`` / ``up_lr_weight`` are a tuple of numbers or a shape name such as ``"sine+0.5"``.
    """

    dims: tuple[int, ...] | None = None
    alphas: tuple[float, ...] | None = None
    conv_dims: tuple[int, ...] | None = None
    conv_alphas: tuple[float, ...] | None = None
    down_lr_weight: tuple[float, ...] | str | None = None
    mid_lr_weight: tuple[float, ...] | None = None
    up_lr_weight: tuple[float, ...] | str | None = None
    zero_threshold: float = 0.0

    @property
    def has_lr_weights(self) -> bool:
        return any(weight is not None for weight in (self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight))

    @property
    def active(self) -> bool:
        """sd-scripts turns per-block ranks on when block_dims or any lr weight is given (the rest alone: no)."""
        return self.dims is not None or self.has_lr_weights

    def network_args(self) -> dict[str, str]:
        """The keys as ``network_args`` strings, so ``ss_network_args`` rebuilds the same network."""
        values = {"block_dims": self.dims, "block_alphas": self.alphas, "conv_block_dims": self.conv_dims,
                  "conv_block_alphas": self.conv_alphas, "down_lr_weight": self.down_lr_weight,
                  "mid_lr_weight": self.mid_lr_weight, "up_lr_weight": self.up_lr_weight}
        args = {key: value if isinstance(value, str) else ",".join(_number_text(v) for v in value)
                for key, value in values.items() if value is not None}
        if self.zero_threshold:
            args["block_lr_zero_threshold"] = _number_text(self.zero_threshold)
        return args


@dataclass(frozen=True)
class BlockRanks:
    """(dim, alpha) per block index for Linear/1x1 layers, and for kxk convs (None: kxk convs not adapted)."""

    dims: tuple[int, ...]
    alphas: tuple[float, ...]
    conv_dims: tuple[int, ...] | None
    conv_alphas: tuple[float, ...] | None


def parse_block_wise(args: dict[str, str]) -> BlockWise | None:
    """The block-wise keys of ``network_args`` (None when there are none); raises :class:`BlockWiseError`."""
    if not any(key in args for key in KEYS):
        return None
    lists = {key: _numbers(args, key, int if "dims" in key else float, allow_empty=False)
             for key in KEYS[:4] if key in args}
    threshold = _numbers(args, "block_lr_zero_threshold", float, allow_empty=False, single=True) \
        if "block_lr_zero_threshold" in args else (0.0,)
    return BlockWise(
        dims=lists.get("block_dims"), alphas=lists.get("block_alphas"), conv_dims=lists.get("conv_block_dims"),
        conv_alphas=lists.get("conv_block_alphas"), down_lr_weight=_side_weights(args, "down_lr_weight"),
        mid_lr_weight=_numbers(args, "mid_lr_weight", float, allow_empty=True) if "mid_lr_weight" in args else None,
        up_lr_weight=_side_weights(args, "up_lr_weight"), zero_threshold=threshold[0])


def check_counts(block_wise: BlockWise, is_sdxl: bool | None = None) -> None:
    """Every per-block list has one number per block: 25 (SD 1.x/2.x) or 23 (SDXL; either when not known)."""
    counts = (SD_BLOCKS, SDXL_BLOCKS) if is_sdxl is None else ((SDXL_BLOCKS,) if is_sdxl else (SD_BLOCKS,))
    for key, values in (("block_dims", block_wise.dims), ("block_alphas", block_wise.alphas),
                        ("conv_block_dims", block_wise.conv_dims), ("conv_block_alphas", block_wise.conv_alphas)):
        if values is not None and len(values) not in counts:
            wanted = " or ".join(f"{count} ({'SDXL' if count == SDXL_BLOCKS else 'SD 1.x/2.x'})" for count in counts)
            raise BlockWiseError(f"network_args {key} must have {wanted} numbers, one per U-Net block (got "
                                 f"{len(values)})")


def block_count(is_sdxl: bool) -> int:
    return SDXL_BLOCKS if is_sdxl else SD_BLOCKS


def block_index(lora_name: str, is_sdxl: bool) -> int:
    """The block a U-Net module's file name belongs to (-1 when none: sd-scripts then reads the last entry)."""
    if not is_sdxl:
        match = DIFFUSERS_BLOCK.search(lora_name)
        if match:
            side, block, kind, layer = match.groups()
            index = 3 * int(block) + (2 if kind in ("upsamplers", "downsamplers") else int(layer))
            return 1 + index if side == "down" else SD_DOWN_OR_UP + 1 + index
        return SD_DOWN_OR_UP if "mid_block_" in lora_name else -1
    if not lora_name.startswith("lora_unet_"):
        return -1
    name = lora_name[len("lora_unet_"):]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    for start, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(start):
            return first + int(name.split("_")[2])
    return 22 if name.startswith("out_") else -1


def lr_weights(block_wise: BlockWise, is_sdxl: bool) -> list[float] | None:
    """The U-Net learning-rate multiplier of every block (None when no lr weight is given)."""
    if not block_wise.has_lr_weights:
        return None
    side, mid = (SDXL_DOWN_OR_UP, SDXL_MID) if is_sdxl else (SD_DOWN_OR_UP, SD_MID)
    down = _fitted("down_lr_weight", _side_list(block_wise.down_lr_weight, side), side)
    middle = _fitted("mid_lr_weight", block_wise.mid_lr_weight, mid)
    up = _fitted("up_lr_weight", _side_list(block_wise.up_lr_weight, side), side)
    weights = [weight if weight > block_wise.zero_threshold else 0.0 for weight in down + middle + up]
    return [1.0, *weights, 1.0] if is_sdxl else weights


def block_ranks(block_wise: BlockWise, is_sdxl: bool, dim: int, alpha: float, conv_dim: int | None,
                conv_alpha: float | None) -> BlockRanks:
    """Each block's ranks: given lists, else network_dim/alpha (and conv_dim/alpha when set) everywhere; blocks
    whose lr weight is 0 get rank 0, so their layers are not made."""
    check_counts(block_wise, is_sdxl)
    count = block_count(is_sdxl)
    dims = list(block_wise.dims or [dim] * count)
    alphas = tuple(block_wise.alphas or [alpha] * count)
    conv_dims = conv_alphas = None
    if block_wise.conv_dims is not None:
        conv_dims = list(block_wise.conv_dims)
        conv_alphas = tuple(block_wise.conv_alphas or [1.0 if conv_alpha is None else conv_alpha] * count)
    elif conv_dim is not None:
        conv_dims, conv_alphas = [conv_dim] * count, (conv_alpha,) * count
    for index, weight in enumerate(lr_weights(block_wise, is_sdxl) or []):
        if weight == 0:
            dims[index] = 0
            if conv_dims is not None:
                conv_dims[index] = 0
    return BlockRanks(tuple(dims), alphas, None if conv_dims is None else tuple(conv_dims), conv_alphas)


def _side_list(value: tuple[float, ...] | str | None, count: int) -> list[float] | None:
    """A down/up weight as numbers: a list as given, a shape name ("sine+0.5") evaluated over ``count`` blocks."""
    if value is None or not isinstance(value, str):
        return None if value is None else list(value)
    name, _, base_text = value.partition("+")
    base = float(base_text) if base_text else 0.0
    steps = [index / (count - 1) for index in range(count)]
    quarter_sine = [math.sin(math.pi * step / 2) for step in steps]
    shapes = {"cosine": quarter_sine[::-1], "sine": quarter_sine, "linear": steps, "reverse_linear": steps[::-1],
              "zeros": [0.0] * count}
    return [weight + base for weight in shapes[name]]


def _fitted(key: str, values: list[float] | tuple[float, ...] | None, count: int) -> list[float]:
    if values is None:
        return [1.0] * count
    values = list(values)
    if len(values) > count:
        logger.warning("network_args %s has %d numbers; the ones after the %d-th are ignored (as in sd-scripts)",
                       key, len(values), count)
    elif len(values) < count:
        logger.warning("network_args %s has %d numbers; the missing ones up to %d are 1 (as in sd-scripts)", key,
                       len(values), count)
    return (values + [1.0] * count)[:count]


def _side_weights(args: dict[str, str], key: str) -> tuple[float, ...] | str | None:
    """A down/up lr weight: comma-separated numbers (empty = 0), or a shape name with an optional ``+base``."""
    if key not in args:
        return None
    text = args[key].strip()
    if "," in text:
        return _numbers(args, key, float, allow_empty=True)
    name, plus, base = text.partition("+")
    if name in LR_WEIGHT_SHAPES and (not plus or _is_finite_number(base)):
        return text
    raise BlockWiseError(f"network_args {key} must be comma-separated numbers (one per block) or one of "
                         f"{', '.join(LR_WEIGHT_SHAPES)} with an optional +base (got {text!r})")


def _numbers(args: dict[str, str], key: str, kind: type, allow_empty: bool, single: bool = False) -> tuple:
    parts = [part.strip() for part in args[key].split(",")]
    if single and len(parts) != 1:
        raise BlockWiseError(f"network_args {key} must be one number (got {args[key]!r})")
    values = []
    for part in parts:
        if not part and allow_empty:
            values.append(kind(0))  # sd-scripts reads an empty lr weight as 0
            continue
        try:
            value = kind(part)
        except ValueError:
            what = "whole numbers" if kind is int else "numbers"
            raise BlockWiseError(f"network_args {key} must be comma-separated {what} (got {args[key]!r})") from None
        if not math.isfinite(value) or ("dims" in key and value < 0):
            raise BlockWiseError(f"network_args {key} must hold finite numbers{' >= 0' if 'dims' in key else ''} "
                                 f"(got {args[key]!r})")
        values.append(value)
    return tuple(values)


def _is_finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _number_text(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else repr(float(value))
