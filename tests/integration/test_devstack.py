"""``runledger dev``: idempotent start, stops only its own services, clear errors on taken ports."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import orjson
import psutil
import pytest

from runledger.streams.dev import devstack
from runledger.streams.settings import Settings
from tests.conftest import CLI, free_ports


def _settings(tmp_path: Path, kafka: int, redis: int) -> Settings:
    return Settings(state_dir=tmp_path, embedded=frozenset({"kafka", "redis"}),
                    kafka_bootstrap_servers=f"127.0.0.1:{kafka}", redis_url=f"redis://127.0.0.1:{redis}/0")


def test_up_twice_starts_nothing_twice_and_down_stops_only_that(tmp_path: Path, stack_env: dict[str, str]) -> None:
    settings = _settings(tmp_path, *free_ports(2))
    first = {s.name: s for s in devstack.up(settings)}
    try:
        assert (first["kafka"].state, first["redis"].state, first["postgres"].state) == (
            "started", "started", "external")
        again = {s.name: s for s in devstack.up(settings)}
        assert again["kafka"].state == again["redis"].state == "running"
        assert again["kafka"].pid == first["kafka"].pid and again["redis"].pid == first["redis"].pid
    finally:
        stopped = {s.name: s for s in devstack.down(settings)}
    assert stopped["kafka"].state == stopped["redis"].state == "stopped"
    assert not psutil.pid_exists(first["kafka"].pid) or psutil.Process(first["kafka"].pid).status() == "zombie"
    assert {s.state for s in devstack.status(settings)} == {"not running", "external"}
    # The session's stack, started from another state dir, was not touched.
    session = Settings(**{k.removeprefix("RUNLEDGER_").lower(): v for k, v in stack_env.items()})
    assert {s.state for s in devstack.status(session)} == {"running"}


def test_a_taken_port_is_a_clear_error_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = _settings(tmp_path, port, free_ports(1)[0])
        with pytest.raises(devstack.DevStackError, match=f"port {port} is already in use") as caught:
            devstack.up(settings)
    assert "RUNLEDGER_EMBEDDED" in str(caught.value)
    assert {s.state for s in devstack.status(settings)} <= {"not running", "external"}


def test_status_command_prints_json(stack_env: dict[str, str]) -> None:
    done = subprocess.run([*CLI, "dev", "status", "--json"], env=stack_env,
                          capture_output=True, text=True, check=True)
    rows = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert {(r["name"], r.get("state")) for r in rows[:3]} == {("postgres", "running"), ("kafka", "running"),
                                                              ("redis", "running")}
    # Then the projection's health: the group's live workers and the partitions they hold back.
    assert rows[3]["name"] == "projection" and rows[3]["workers"] == [] and rows[3]["problems"] == []
