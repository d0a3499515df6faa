"""Process-wide tuning for runledger's long-running commands (the worker, verification, rebuild)."""

from __future__ import annotations

import gc

__all__ = ["tune_gc"]


def tune_gc() -> None:
    """What start-up made (modules, Faust, the price catalog) goes to the permanent generation, and young
    collections run less often: collections over a large heap otherwise cost several µs per event (about as much
    as hashing it), while each event's objects are freed by reference counting anyway."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
