"""Seeded randomness without side effects: :func:`seeded` runs a block with the global CPU RNG seeded and
puts the RNG back afterwards, so what a block draws (a module's initial weights, a noise sample) depends
on its own seed only and the caller's random stream is left as it was."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run with the global CPU RNG seeded by ``seed`` and restore it afterwards (``None``: untouched)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield
