"""Process-wide tuning for runledger's long-running commands (the worker, verification, rebuild), and running a
worker's loops together."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Iterable

__all__ = ["run_together", "tune_gc"]


def tune_gc() -> None:
    """What start-up made (modules, Faust, the price catalog) goes to the permanent generation, and young
    collections run less often: collections over a large heap otherwise cost several µs per event (about as much
    as hashing it), while each event's objects are freed by reference counting anyway."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def run_together(loops: Iterable[Awaitable[None]]) -> None:
    """Run ``loops`` (each runs until cancelled) until the first ends, which only an error does: then cancel the
    others and raise it. A worker stops rather than run half-blind."""
    tasks = [asyncio.ensure_future(loop) for loop in loops]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
