"""Bounded waits on PostgreSQL: the session settings a worker's connections get, a lock timeout as an error of its
own, and a batch that meets one tried again in place, never forwarded to the retry topics (a pair with the outage
that is forwarded)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from runledger.projections.postgres.db import StoreLockTimeout, StoreUnavailable, database_error
from runledger.projections.records import BatchResult, LogRecord
from runledger.streams.settings import Settings
from runledger.streams.worker.outbox import BatchHandler
from runledger.streams.worker.retry import RetrySchedule


def test_worker_connections_bound_lock_waits_idle_transactions_and_silent_peers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().db_session == {
        "lock_timeout": "5000ms", "idle_in_transaction_session_timeout": "10000ms", "tcp_keepalives_idle": "10",
        "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3", "tcp_user_timeout": "25000"}
    monkeypatch.setenv("RUNLEDGER_DB_LOCK_TIMEOUT_S", "0.25")
    monkeypatch.setenv("RUNLEDGER_DB_IDLE_IN_TRANSACTION_TIMEOUT_S", "2")
    monkeypatch.setenv("RUNLEDGER_DB_KEEPALIVES_COUNT", "4")
    session = Settings().db_session
    assert (session["lock_timeout"], session["idle_in_transaction_session_timeout"]) == ("250ms", "2000ms")
    assert session["tcp_user_timeout"] == str((10 + 5 * 4) * 1000)


def test_a_lock_timeout_is_an_error_of_its_own_not_an_outage() -> None:
    error = database_error(asyncpg.LockNotAvailableError("canceling statement due to lock timeout"), "batch")
    assert type(error) is StoreLockTimeout and error.transient and error.code == "database_lock_timeout"
    # Elsewhere (a replay, a rebuild), retried as any unavailability is.
    assert isinstance(error, StoreUnavailable)
    other = database_error(asyncpg.ObjectInUseError("in use"), "batch")  # class 55, not a lock timeout
    assert type(other) is StoreUnavailable


class _Store:
    """Fails with ``errors`` in turn, then applies the batch."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors, self.calls = errors, 0

    async def apply_batch(self, records: Any, *, route: Any) -> BatchResult:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return BatchResult(projected=[("s", 1)], lock_wait_s=0.5)


class _Forwarder:
    schedule = RetrySchedule("t", (1.0,))

    def __init__(self) -> None:
        self.forwarded: list[Any] = []

    async def retry_all(self, records: Any, error: Exception) -> list[Any]:
        self.forwarded += records
        return []


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_a_batch_that_meets_a_held_lock_is_tried_again_in_place() -> None:
    store = _Store([StoreLockTimeout("lock timeout", 1.0), StoreLockTimeout("lock timeout", 2.0)])
    forwarder = _Forwarder()
    timeouts, waits, waited = (_sample("runledger_batch_lock_timeouts_total"),
                               _sample("runledger_batch_lock_wait_seconds_count"),
                               _sample("runledger_batch_lock_wait_seconds_sum"))
    result = await BatchHandler(store, forwarder, None).handle(  # type: ignore[arg-type]
        [LogRecord("t.events", 0, 0, b"s", b"{}")])
    assert result is not None and result.projected == [("s", 1)] and store.calls == 3
    assert forwarder.forwarded == []
    assert _sample("runledger_batch_lock_timeouts_total") == timeouts + 2
    # One batch: its lock waits, the two that timed out and the one that took its locks, observed once.
    assert _sample("runledger_batch_lock_wait_seconds_count") == waits + 1
    assert _sample("runledger_batch_lock_wait_seconds_sum") == pytest.approx(waited + 3.5)


async def test_a_batch_that_meets_an_outage_is_forwarded_to_the_retry_topics() -> None:
    store, forwarder = _Store([StoreUnavailable("connection refused")]), _Forwarder()
    record = LogRecord("t.events", 0, 0, b"s", b"{}")
    assert await BatchHandler(store, forwarder, None).handle([record]) is None  # type: ignore[arg-type]
    assert forwarder.forwarded == [record] and store.calls == 1
