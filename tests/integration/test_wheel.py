"""A built wheel works outside the repository: ``pip install dist/runledger-*.whl`` into a fresh venv, then
``runledger demo`` from a directory that is not the checkout, its SQL read from the installed package."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from runledger.streams.settings import Settings
from tests.conftest import ROOT


@pytest.fixture
async def schema(settings: Settings) -> AsyncIterator[str]:
    name = f"w_{uuid.uuid4().hex[:10]}"
    yield name
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done  # type: ignore[no-any-return]


@pytest.mark.slow
def test_built_wheel_runs_the_demo_outside_the_repository(tmp_path: Path, env: dict[str, str], schema: str) -> None:
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
         timeout=300)
    wheel, = (tmp_path / "dist").glob("runledger-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(wheel)], timeout=900)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RUNLEDGER_", "PYTHON", "VIRTUAL_ENV"))}
    run_env = {**clean, **env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}"}
    where = _run([str(venv / "bin/python"), "-c",
                  "import runledger.projections.postgres.queries as q, runledger.schemas as s; "
                  "print(q.SQL_DIR); print(s.__file__)"], cwd=elsewhere, env=run_env, timeout=60)
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(venv), f"{line} is not the installed package"

    demo = _run([str(venv / "bin/runledger"), "demo", "--executions", "20", "--seed", "5"], cwd=elsewhere,
                env=run_env, timeout=300)
    assert "chains checked intact: 20 of 20" in demo.stdout
    assert "spend by model" in demo.stdout
