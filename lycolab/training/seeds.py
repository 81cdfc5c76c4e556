"""Random streams derived from the run's seed and a position, so randomness never depends on history.

Each global batch gets its own noise and timesteps, and each image in it its own flip, crop and caption shuffle,
from a seed made of (run seed, epoch, batch, slot). A resumed run, or one split across processes, therefore
draws exactly what an uninterrupted single process draws, without replaying anything.
"""

from __future__ import annotations

import hashlib
import random

import torch


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers; different tuples give unrelated seeds."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def python_rng(*parts: int) -> random.Random:
    return random.Random(derived_seed(*parts))


def torch_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))
