"""Diag-OFT: the layer's output channels rotated by a block-diagonal orthogonal matrix, W' = D · Rᵀ · W.

As LyCORIS' ``diag-oft``: the output size is split into n blocks of b channels with (b, n) =
``factorization(out_dim, dim)`` (so ``dim`` is the block size when it divides the output size and is at most its
square root; otherwise the nearest split with b ≤ n); ``oft_blocks`` (n, b, b) start at zero and each block's
rotation is the Cayley transform of its skew part (:func:`~lycolab.networks.oft_math.cayley`), applied to the block's
rows of W as Rᵀ. The multiplier m moves every block linearly towards the identity, I + m(R − I), and
``rank_dropout`` drops elements of m·R (scaled by 1/(1 − p), ``nn.Dropout`` on it) while training, as LyCORIS'
merged-weight forward. Forward applies the rotation to the layer's output (see :mod:`lycolab.networks.oft_math`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lycolab.networks.algorithms.lokr import factorization
from lycolab.networks.oft_math import OFTOptions, OrthogonalAdapter, cayley
from lycolab.networks.registry import Algorithm


@dataclass(frozen=True)
class DiagOFTOptions(OFTOptions):
    """diag-OFT's options (``constraint``, ``rescaled``)."""


class DiagOFTModule(OrthogonalAdapter):
    algo = "diag-oft"
    options_class = DiagOFTOptions

    def block_shape(self, out_dim: int, dim: int) -> tuple[int, int, int]:
        size, count = factorization(out_dim, dim)
        return count, size, size

    @property
    def half_strides(self) -> tuple[int, ...]:
        return (0,)  # one stage of contiguous blocks

    def stages(self, multiplier: float, rank_dropout: bool) -> list[torch.Tensor]:
        rotation = cayley(self.oft_blocks, self.norm_limit)
        eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
        if rank_dropout:
            blocks = F.dropout(rotation * multiplier, self.rank_dropout) + (1 - multiplier) * eye
        elif multiplier != 1:
            blocks = rotation * multiplier + (1 - multiplier) * eye
        else:
            blocks = rotation
        return [blocks.transpose(-1, -2)]  # LyCORIS' einsum "k n m, k n ... -> k m ..." applies Rᵀ


def holds_diag_blocks(parameters: dict[str, torch.Tensor]) -> bool:
    """diag-OFT's ``oft_blocks`` are (n, b, b); BOFT's have a stage axis in front."""
    return parameters["oft_blocks"].dim() == 3


ALGORITHM = Algorithm(name="diag-oft", title="Diag-OFT", module_class=DiagOFTModule, markers=("oft_blocks",),
                      accepts=holds_diag_blocks, category="Diag-OFT", uses_dropout=False, menu_order=40,
                      recommended_dims=(2, 64),
                      recommendation="network_dim is the block size: 4–32 (a divisor of the layers' widths, e.g. "
                                     "8 or 16 for SD's 320/640/1280); alpha is unused, network_args constraint "
                                     "caps the rotation")
