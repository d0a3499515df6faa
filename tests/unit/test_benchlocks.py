"""The bench's lock-wait figures from samples, as they are printed, and a sampler that cannot connect."""

from __future__ import annotations

import io
import socket
from typing import Any

from runledger.streams.dev.bench import print_report
from runledger.streams.dev.benchlocks import LockSampler, Tick, combine, summarize, tick_of, worker_database_url
from runledger.streams.dev.benchpaths import _lock_spread
from runledger.streams.settings import Settings

TLOG_LOCK = "SELECT size, peaks FROM tlog_state FOR UPDATE;"


def _row(pid: int, in_transaction: bool, event_type: str | None = None, event: str | None = None,
         query: str = "", blockers: list[int] | None = None) -> dict[str, Any]:
    return {"pid": pid, "in_transaction": in_transaction, "wait_event_type": event_type, "wait_event": event,
            "query": query, "blockers": blockers}


def test_a_tick_counts_backends_in_a_transaction_and_those_waiting_for_a_lock() -> None:
    tick = tick_of(1.0, [
        _row(1, True),  # running its batch
        _row(2, True, "Lock", "transactionid", f"  {TLOG_LOCK}\n", [1]),  # behind worker 1
        _row(3, True, "Lock", "advisory", "SELECT pg_advisory_xact_lock(1)", [99]),  # behind someone else
        _row(4, True, "IO", "DataFileRead"),  # waiting, but not for a lock
        _row(5, False, "Client", "ClientRead"),  # idle
    ])
    assert tick.in_transaction == 4
    assert [(w.event, w.statement, w.by_worker) for w in tick.waits] == [
        ("transactionid", TLOG_LOCK, True), ("advisory", "SELECT pg_advisory_xact_lock(1)", False)]


def test_the_share_is_lock_waits_over_samples_in_a_transaction_and_none_without_any() -> None:
    wait = tick_of(0, [_row(1, True), _row(2, True, "Lock", "transactionid", TLOG_LOCK, [1])]).waits
    ticks = [Tick(0.0, 2, wait), Tick(0.1, 2, ()), Tick(0.2, 0, ())]
    one = summarize(ticks, 0.1)
    assert (one["ticks"], one["in_transaction"], one["waiting"], one["share"]) == (3, 4, 1, 0.25)
    assert one["by_event"] == {"transactionid": 1} and one["blocked_by_worker"] == 1
    assert one["statements"] == [[TLOG_LOCK, 1]]
    idle = summarize([Tick(0.0, 0, ())], 0.1, failed_ticks=2, errors=["a sample failed: boom"])
    assert idle["share"] is None and idle["failed_ticks"] == 2

    path = _lock_spread([one, summarize([Tick(0.0, 1, wait)], 0.1), idle])
    assert (path["min"], path["median"], path["max"]) == (0.25, 0.625, 1.0) and path["rounds"] == [0.25, 1.0]
    assert path["top_statement"] == {"query": TLOG_LOCK, "samples": 2} and path["waiting"] == 2
    assert path["failed_ticks"] == 2 and path["errors"] == ["a sample failed: boom"] and len(path["per_round"]) == 3
    none = _lock_spread([idle])
    assert none["median"] is None and none["rounds"] == [] and none["top_statement"] is None
    assert combine([])["shares"] == []


def test_the_report_prints_each_worker_paths_lock_waits_and_the_statement_waited_in_most() -> None:
    wait = tick_of(0, [_row(1, True), _row(2, True, "Lock", "transactionid", TLOG_LOCK, [1])]).waits
    idle = summarize([Tick(0.0, 0, ())], 0.1, failed_ticks=1, errors=["a sample failed: boom"])
    rate = {"median": 1.0, "min": 1.0, "max": 1.0, "rounds": [1.0]}
    report = {"machine": {"cpus": 2, "memory_gib": 1, "python": "3"},
              "throughput": {"events": 10, "executions": 1, "rounds": 1,
                             "events_per_s": {"floor": rate, "workers_1": rate, "workers_2": rate},
                             "share_of_floor": {"workers_1": rate, "workers_2": rate},
                             "lock_wait": {"workers_1": _lock_spread([idle]),
                                           "workers_2": _lock_spread([summarize([Tick(0, 2, wait)], 0.1)])}}}
    out = io.StringIO()
    print_report(report, out)
    lines = out.getvalue().splitlines()
    assert any(line.split()[:4] == ["workers_1", "-", "-", "-"] for line in lines)
    assert any(line.split()[:4] == ["workers_2", "50.0%", "50.0%", "50.0%"] and "transactionid 1" in line
               for line in lines)
    assert f"  workers_2 waited most in (1 samples): {TLOG_LOCK}" in lines
    assert "  workers_1: 1 sample(s) failed: a sample failed: boom" in lines


def test_the_workers_url_names_their_schema_and_keeps_its_other_parameters() -> None:
    settings = Settings(database_url="postgresql://u@h:5/db?sslmode=disable&application_name=x", db_schema="s1")
    assert worker_database_url(settings) == ("postgresql://u@h:5/db?sslmode=disable&"
                                             "application_name=runledger-bench+s1")


async def test_a_sampler_that_cannot_connect_reports_it_and_stops_quietly() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sampler = LockSampler(f"postgresql://postgres@127.0.0.1:{port}/x", "nobody", every=0.01)
    async with sampler:
        pass
    assert sampler.ticks == [] and sampler.failed_ticks == 1
    assert sampler.errors[0].startswith("cannot connect to sample lock waits")
    assert sampler.summary()["share"] is None
