"""BOFT (butterfly OFT): the output channels rotated by a product of sparse orthogonal stages, W' = D · T_m ⋯ T_1 · W.

As LyCORIS' ``boft``: the output size is n blocks of b channels, b the largest even size ≤ ``dim`` with n a power of
two (:func:`butterfly_factorization`; a layer with no such split is an error, as there), and ``oft_blocks`` holds
m = popcount(n − 1) + 1 stages (m, n, b, b), zero at first. Stage i pairs channel j with j + 2^i·b/2 (a butterfly)
and rotates each block by the Cayley transform of its skew part; the constraint caps ‖Q‖ over all stages at once.
The multiplier moves every stage towards the identity, m·R + (1 − m)·I. ``dropout`` and ``rank_dropout`` are not
used, as in LyCORIS' BOFT. Forward applies the stages to the layer's output (see :mod:`lycolab.networks.oft_math`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lycolab.networks.oft_math import OFTOptions, OrthogonalAdapter, cayley, toward_identity
from lycolab.networks.registry import Algorithm


def butterfly_factorization(dimension: int, factor: int = -1) -> tuple[int, int] | None:
    """(block size b, block count n) with b·n = dimension, b even and at most ``factor`` (-1: no limit), n a power of
    two and b the largest such; None when there is none. Same results as LyCORIS' ``power2factorization``."""
    limit = dimension if factor == -1 else factor
    sizes = [size for size in range(2, min(limit, dimension) + 1, 2)
             if dimension % size == 0 and (dimension // size).bit_count() == 1]
    return (sizes[-1], dimension // sizes[-1]) if sizes else None


def stage_count(blocks: int) -> int:
    """How many butterfly stages LyCORIS gives n blocks: popcount(n − 1) + 1 (log2 n + 1 for a power of two)."""
    return (blocks - 1).bit_count() + 1


@dataclass(frozen=True)
class BOFTOptions(OFTOptions):
    """BOFT's options (``constraint``, ``rescaled``)."""


class BOFTModule(OrthogonalAdapter):
    algo = "boft"
    options_class = BOFTOptions

    def block_shape(self, out_dim: int, dim: int) -> tuple[int, int, int, int]:
        split = butterfly_factorization(out_dim, dim)
        if split is None:
            odd = out_dim // (out_dim & -out_dim)
            hint = (f"use a dim of at least {2 * odd}" if out_dim % 2 == 0 else "no dim can (its size is odd)")
            raise ValueError(f"{self.lora_name}: BOFT cannot split {out_dim} output channels into even blocks of "
                             f"at most {dim} whose count is a power of two; {hint}")
        size, count = split
        return stage_count(count), count, size, size

    @property
    def half_strides(self) -> tuple[int, ...]:
        """Stage i pairs channels 2^i·b/2 apart."""
        half = self.oft_blocks.shape[-1] // 2
        return tuple(half * 2**stage for stage in range(self.oft_blocks.shape[0]))

    def stages(self, multiplier: float, rank_dropout: bool) -> list[torch.Tensor]:
        return list(toward_identity(cayley(self.oft_blocks, self.norm_limit), multiplier).unbind(0))


def holds_butterfly_blocks(parameters: dict[str, torch.Tensor]) -> bool:
    """BOFT's ``oft_blocks`` are (stages, n, b, b); diag-OFT's have no stage axis."""
    return parameters["oft_blocks"].dim() == 4


ALGORITHM = Algorithm(name="boft", title="BOFT", module_class=BOFTModule, markers=("oft_blocks",),
                      accepts=holds_butterfly_blocks, category="BOFT", uses_dropout=False, menu_order=50,
                      recommended_dims=(2, 64),
                      recommendation="network_dim is the largest block size: 8–32, and each layer's width must be "
                                     "an even block size times a power of two (SD's 320 = 10·32 needs dim ≥ 10); "
                                     "alpha is unused, network_args constraint caps the rotation")
