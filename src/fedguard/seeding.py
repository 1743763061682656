"""Seeded random streams.

Every random stream is derived from the config seed plus a purpose and indices (round, client), never
from a running global generator. A round therefore draws the same numbers whether the run went
straight through or was resumed from a checkpoint.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that depends on ``seed`` and every key, stable across processes and Python versions."""
    h = hashlib.sha256(repr((int(seed),) + tuple(str(k) for k in keys)).encode("utf-8"))
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def python_rng(seed: int, *keys: object) -> random.Random:
    return random.Random(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *keys))
    return g
