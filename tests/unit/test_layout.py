"""The layout keeps the sides apart: appending events never loads the PostgreSQL side, and the command line loads
a command's heavy modules only when that command runs."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest


def _loaded_after(*modules: str) -> list[str]:
    """Every module in ``sys.modules`` after a fresh interpreter imports ``modules`` (this process has imported
    far more already)."""
    code = ("import sys, json\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return list(orjson.loads(done.stdout))


@pytest.mark.parametrize("module", ["runledger.streams.producer.client", "runledger.streams.producer.events",
                                    "runledger.streams.producer.heads", "runledger.streams.producer.recovery"])
def test_the_producer_never_loads_the_postgresql_side(module: str) -> None:
    loaded = _loaded_after(module)
    assert module in loaded
    assert [m for m in loaded if m.startswith(("runledger.projections.postgres", "asyncpg"))] == []


def test_the_command_line_loads_neither_postgresql_nor_faust_until_a_command_needs_them() -> None:
    loaded = _loaded_after("runledger.streams.cli")
    assert [m for m in loaded if m.startswith(("runledger.projections.postgres", "asyncpg", "faust"))] == []
