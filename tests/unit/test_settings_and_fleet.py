"""Settings from RUNLEDGER_* variables, and the simulated fleet the demo appends."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from runledger.schemas.chain import GENESIS_HASH, compute_hash, verify_chain
from runledger.schemas.events import format_time, parse_event
from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.producer.events import check_new_events
from runledger.streams.settings import Settings


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNLEDGER_RETRY_DELAYS", "1, 3,9")
    monkeypatch.setenv("RUNLEDGER_EMBEDDED", "kafka,redis")
    monkeypatch.setenv("RUNLEDGER_DATABASE_URL", "postgresql://u@db.internal:6543/x")
    settings = Settings()
    assert settings.retry_delays == (1.0, 3.0, 9.0)
    assert settings.embedded == {"kafka", "redis"}
    assert settings.port_of("postgres") == 6543 and settings.port_of("kafka") == 19092
    assert settings.events_topic == "runledger.events"


def test_a_bad_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNLEDGER_EMBEDDED", "kafka,mysql")
    with pytest.raises(ValidationError, match="embedded"):
        Settings()


def test_the_fleet_is_valid_varied_and_reproducible() -> None:
    start = datetime(2026, 11, 22, tzinfo=UTC)
    fleet = simulate_fleet(200, seed=3, run_tag="t", start=start)
    assert fleet == simulate_fleet(200, seed=3, run_tag="t", start=start)
    assert fleet != simulate_fleet(200, seed=4, run_tag="t", start=start)
    assert {run.outcome for run in fleet} == {"completed", "failed", "cancelled", "timed_out"}
    types = {event.type for run in fleet for event in run.events}
    assert types == {"execution.started", "step.started", "step.retrying", "step.completed", "step.failed",
                     "step.skipped", "cost.incurred", "artifact.created", "execution.completed",
                     "execution.failed", "execution.cancelled", "execution.timed_out"}
    costs = [e.data for run in fleet for e in run.events if e.type == "cost.incurred"]
    assert any("cost_usd" in c for c in costs) and any("cost_usd" not in c for c in costs)
    for run in fleet:
        check_new_events(run.stream_id, run.events)
        assert run.events[0].type == "execution.started"


def test_fleet_events_chain_as_a_producer_would_chain_them() -> None:
    run = simulate_fleet(1, seed=5)[0]
    prev, chained = GENESIS_HASH, []
    for seq, new in enumerate(run.events, start=1):
        raw = {"specversion": "1.0", "id": f"00000000-0000-4000-8000-{seq:012d}", "source": "/t",
               "type": new.type, "subject": run.stream_id, "time": format_time(new.time),  # type: ignore[arg-type]
               "datacontenttype": "application/json", "seq": seq, "prevhash": prev, "data": dict(new.data)}
        raw["hash"] = prev = compute_hash(raw)
        parse_event(raw)
        chained.append(raw)
    assert verify_chain(chained) == []


def test_fleet_money_is_always_a_plain_decimal_string() -> None:
    # Small costs once came out as "1.7E-7": exponent form is not money (SPEC.md section 4).
    money = re.compile(r"^(0|[1-9][0-9]*)(\.[0-9]{1,12})?$")
    for seed in range(1, 101):
        for run in simulate_fleet(300, seed=seed):
            check_new_events(run.stream_id, run.events)
            for event in run.events:
                if "cost_usd" in event.data:
                    assert money.match(event.data["cost_usd"]), (seed, run.stream_id, event.data["cost_usd"])
