"""``runledger bench``: how much of the workers' transaction time is spent waiting for locks.

While a worker path runs, a ``LockSampler`` reads ``pg_stat_activity`` from one connection of its own, one
query a tick (every 100 ms): the client backends of that path's workers, recognised by the
``application_name`` the bench gives their connections (``worker_database_url``: a parameter of the URL,
which asyncpg sends as a startup setting, so the workers' code is not touched). A backend inside a
transaction (``xact_start`` set) is one in-transaction sample; one whose ``wait_event_type`` is ``Lock`` is also
a lock-wait sample, noted with its ``wait_event`` (``transactionid``: a row another transaction holds;
``tuple``: queued behind another waiter for that row; ``advisory``, ``relation``, ...), the statement it
waits in, and whether a backend of another worker holds the lock (``pg_blocking_pids``, asked only of the
waiting ones). The lock-wait share of a run is lock-wait samples over in-transaction samples: the share of
the time the workers' transactions, the batches, spent waiting for a lock.

The sampler never stops the bench: a failed tick, or a connection it cannot open, is counted and reported
with the figures, and ``stop`` closes its connection whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from runledger.streams.settings import Settings

__all__ = ["LockSampler", "Tick", "combine", "summarize", "worker_application_name", "worker_database_url"]

# The workers' client backends, one row each; the blockers only of those waiting for a lock (pg_blocking_pids
# takes the lock manager's locks, so it is not asked of every backend at every tick).
SAMPLE_QUERY = """
SELECT pid, xact_start IS NOT NULL AS in_transaction, wait_event_type, wait_event, left(query, $2) AS query,
       CASE WHEN wait_event_type = 'Lock' THEN pg_blocking_pids(pid) END AS blockers
  FROM pg_stat_activity
 WHERE application_name = $1 AND backend_type = 'client backend'
"""
SAMPLER_APPLICATION_NAME = "runledger-bench-sampler"
QUERY_CHARS = 200  # of each waiting statement's text
MAX_ERRORS = 5  # distinct messages kept per run; every failed tick is counted


def worker_application_name(settings: Settings) -> str:
    """The ``application_name`` of the bench's workers on ``settings``' schema (under PostgreSQL's 63 bytes)."""
    return f"runledger-bench {settings.db_schema}"[:63]


def worker_database_url(settings: Settings) -> str:
    """``settings.database_url`` with the workers' ``application_name`` (any other parameter kept)."""
    parts = urlsplit(settings.database_url)
    params = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "application_name"]
    params.append(("application_name", worker_application_name(settings)))
    return urlunsplit(parts._replace(query=urlencode(params)))


@dataclass(frozen=True)
class Wait:
    """One backend, in one tick, waiting for a lock."""

    event: str  # wait_event: transactionid, tuple, advisory, relation, ...
    statement: str  # what it waits in, whitespace collapsed, at most QUERY_CHARS
    by_worker: bool  # a backend of another of the path's workers holds the lock


@dataclass(frozen=True)
class Tick:
    """One sample: when (``time.monotonic``), how many worker backends were in a transaction, and which waited."""

    at: float
    in_transaction: int
    waits: tuple[Wait, ...]


def tick_of(at: float, rows: list[asyncpg.Record] | list[dict[str, Any]]) -> Tick:
    """The tick that ``SAMPLE_QUERY``'s ``rows`` describe."""
    pids = {r["pid"] for r in rows}
    busy = [r for r in rows if r["in_transaction"]]
    waits = tuple(Wait(r["wait_event"] or "?", " ".join((r["query"] or "").split()),
                       any(b in pids and b != r["pid"] for b in r["blockers"] or ()))
                  for r in busy if r["wait_event_type"] == "Lock")
    return Tick(at, len(busy), waits)


class LockSampler:
    """Samples the lock waits of the backends named ``application_name`` every ``every`` seconds, from ``start``
    to ``stop``, on one connection to ``database_url`` of its own."""

    def __init__(self, database_url: str, application_name: str, *, every: float = 0.1) -> None:
        self.database_url, self.application_name, self.every = database_url, application_name, every
        self.ticks: list[Tick] = []
        self.failed_ticks = 0
        self.errors: list[str] = []
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bench lock sampler")

    async def stop(self) -> None:
        """End sampling and close the connection; never raises (what went wrong is in ``errors``)."""
        self._stopping.set()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=max(5.0, self.every * 10))
        if not done:  # stuck in a query past its own timeout: cancel it (the connection is closed on the way out)
            self._task.cancel()
        [outcome] = await asyncio.gather(self._task, return_exceptions=True)
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            self._error(f"the sampler failed: {type(outcome).__name__}: {outcome}")

    async def __aenter__(self) -> LockSampler:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _error(self, message: str) -> None:
        self.failed_ticks += 1
        if message not in self.errors and len(self.errors) < MAX_ERRORS:
            self.errors.append(message)

    async def _run(self) -> None:
        try:
            conn = await asyncpg.connect(self.database_url, timeout=10,
                                         server_settings={"application_name": SAMPLER_APPLICATION_NAME})
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            self._error(f"cannot connect to sample lock waits: {type(e).__name__}: {e}")
            return
        try:
            statement = await conn.prepare(SAMPLE_QUERY)
            due = time.monotonic()
            while not self._stopping.is_set():
                at = time.monotonic()
                try:
                    rows = await statement.fetch(self.application_name, QUERY_CHARS, timeout=max(1.0, self.every))
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                    self._error(f"a sample failed: {type(e).__name__}: {e}")
                    if conn.is_closed():
                        return
                else:
                    self.ticks.append(tick_of(at, rows))
                due = max(due + self.every, time.monotonic())  # a slow tick delays the next, never bunches them
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), due - time.monotonic())
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            self._error(f"cannot sample lock waits: {type(e).__name__}: {e}")
        finally:
            with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await conn.close(timeout=5)

    def summary(self, start: float = float("-inf"), end: float = float("inf")) -> dict[str, Any]:
        """``summarize`` of the ticks taken from ``start`` to ``end`` (``time.monotonic``)."""
        return summarize([t for t in self.ticks if start <= t.at <= end], self.every, self.failed_ticks, self.errors)


def summarize(ticks: list[Tick], every: float, failed_ticks: int = 0,
              errors: list[str] | None = None) -> dict[str, Any]:
    """One run's lock waits: ticks, in-transaction and lock-wait samples, their ``share`` (None without a sample
    in a transaction), the waits by ``wait_event``, how many a worker's lock held, the statements waited in
    most, and the sampling errors."""
    in_transaction = sum(t.in_transaction for t in ticks)
    waits = [w for t in ticks for w in t.waits]
    return {"every_s": every, "ticks": len(ticks), "in_transaction": in_transaction, "waiting": len(waits),
            "share": len(waits) / in_transaction if in_transaction else None,
            "by_event": dict(Counter(w.event for w in waits).most_common()),
            "blocked_by_worker": sum(w.by_worker for w in waits),
            "statements": [[s, n] for s, n in Counter(w.statement for w in waits).most_common(3)],
            "failed_ticks": failed_ticks, "errors": list(errors or [])}


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's rounds (``summarize`` each) together: the shares of the rounds that had samples (``shares``),
    totals, the waits by event, the statement waited in most (``top_statement``: ``query`` and ``samples``, or
    None), every error, and the rounds themselves."""
    statements: Counter[str] = Counter()
    by_event: Counter[str] = Counter()
    for r in rounds:
        statements.update({s: n for s, n in r["statements"]})
        by_event.update(r["by_event"])
    top = statements.most_common(1)
    return {"shares": [r["share"] for r in rounds if r["share"] is not None],
            "in_transaction": sum(r["in_transaction"] for r in rounds),
            "waiting": sum(r["waiting"] for r in rounds),
            "by_event": dict(by_event.most_common()),
            "blocked_by_worker": sum(r["blocked_by_worker"] for r in rounds),
            "top_statement": {"query": top[0][0], "samples": top[0][1]} if top else None,
            "failed_ticks": sum(r["failed_ticks"] for r in rounds),
            "errors": list(dict.fromkeys(e for r in rounds for e in r["errors"])),
            "per_round": rounds}
