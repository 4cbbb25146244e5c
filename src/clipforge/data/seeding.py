"""Reproducible per-sample randomness: run a block with every global RNG seeded, then restore them."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def forked_rng(seed: int) -> Iterator[None]:
    """Run a block with torch, Python and NumPy RNGs seeded to `seed`, restoring their states afterwards."""
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])
