"""Sending messages to endpoints, and keeping what became of each attempt.

``Deliverer.attempt`` makes one signed attempt of one message (``sender.post``) and says what follows it
(``schedule.after``). ``Recorder.record`` writes attempts in PostgreSQL, many at a time in one transaction (a
group commit): each attempt's row of ``webhook_deliveries``, its message moved on (delivered, retrying or dead),
the copy of a failed one for its retry topic or the dead-letter topic (the outbox, published after the commit, as
the projection's), and the endpoint's health (failing since when; disabled once that is longer than
``RUNLEDGER_WEBHOOK_DISABLE_AFTER_S``). A write that fails is tried again until PostgreSQL answers: a worker that
dies meanwhile sends the message again, with the same ``webhook-id``.

``Dispatcher`` sends what the worker's log partitions owe: each (endpoint, stream) in seq order, one message after
the other's 2xx, many (endpoint, stream) at once, at most ``RUNLEDGER_WEBHOOK_CONCURRENCY`` requests open to one
endpoint. A message that fails holds back its own (endpoint, stream) until it is delivered (a retry) or replayed
(dead), and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from runledger.projections.postgres.db import database_error
from runledger.projections.postgres.queries import query
from runledger.streams import metrics
from runledger.streams.http.keys import SourcesKey
from runledger.streams.settings import Settings
from runledger.streams.webhooks.endpoints import EndpointNotFound, delivery_secrets
from runledger.streams.webhooks.messages import retry_headers
from runledger.streams.webhooks.schedule import Next, after
from runledger.streams.webhooks.sender import Attempt, post, signature_header
from runledger.streams.webhooks.targets import Target, TargetRefused, parse_target
from runledger.streams.worker.retry import webhook_dlq_topic, webhook_retry_topic

__all__ = ["Deliverer", "Dispatcher", "Outcome", "Recorder"]

log = logging.getLogger(__name__)

_SECRETS_TTL_S = 5.0  # a rotation or a new URL reaches the attempts within this
_OWED_LIMIT, _RUN_LIMIT = 2000, 100  # messages read per round, and per (endpoint, stream) of them
_OWED_BYTES = 64 * 2**20  # and about this many bytes of bodies at most (an event may be 512 KiB)
_REST_S = 5.0  # an (endpoint, stream) whose run made no attempt (PostgreSQL, a fault) waits this long
_POLL_S = 0.5  # a round at least this often: retries delivered by another worker free what they held back


@dataclass(frozen=True, slots=True)
class Outcome:
    """Attempt ``number`` of message ``msg_id`` at ``at``, what it got, and what follows."""

    msg_id: str
    endpoint_id: str
    stream_id: str
    number: int
    retry: int  # the number of the retry that follows, if one does
    at: datetime
    attempt: Attempt
    next: Next


@dataclass(slots=True)
class _Endpoint:
    target: Target | None
    refused: str | None
    secrets: list[str]
    read_at: float


class Deliverer:
    """Makes attempts: signed, to the address checked, at most ``webhook_concurrency`` open to one endpoint."""

    def __init__(self, pool: asyncpg.Pool, key: SourcesKey, settings: Settings) -> None:
        self._pool, self._key, self._settings = pool, key, settings
        self._endpoints: dict[str, _Endpoint] = {}
        self._open: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(settings.webhook_concurrency))

    async def _endpoint(self, endpoint_id: str) -> _Endpoint | None:
        known = self._endpoints.get(endpoint_id)
        if known is not None and time.monotonic() - known.read_at < _SECRETS_TTL_S:
            return known
        async with self._pool.acquire() as conn:
            try:
                url, secrets = await delivery_secrets(conn, self._key, endpoint_id)
            except EndpointNotFound:
                self._endpoints.pop(endpoint_id, None)
                return None
        allow = self._settings.webhook_allow_private
        try:
            target, refused = parse_target(url, allow_private=allow), None
        except TargetRefused as e:
            target, refused = None, str(e)
        known = self._endpoints[endpoint_id] = _Endpoint(target, refused, secrets, time.monotonic())
        return known

    async def attempt(self, msg_id: str, endpoint_id: str, stream_id: str, body: bytes, number: int,
                      event_time: datetime | None = None, *, replayed_after: int = 0) -> Outcome | None:
        """Attempt ``number`` (1: the first) of a message, the retries counted from ``replayed_after`` (the
        attempts before its last replay); None if its endpoint was removed meanwhile (the message stays as it is).
        Raises what PostgreSQL raises reading the endpoint."""
        endpoint = await self._endpoint(endpoint_id)
        if endpoint is None:
            return None
        at = datetime.now(UTC)
        if endpoint.target is None:
            got = Attempt(None, 0.0, error=f"refused: {endpoint.refused}")
        else:
            stamp = int(time.time())
            headers = {"webhook-id": msg_id, "webhook-timestamp": str(stamp),
                       "webhook-signature": signature_header(endpoint.secrets, msg_id, stamp, body)}
            async with self._open[endpoint_id]:
                try:
                    got = await post(endpoint.target, body, headers,
                                     allow_private=self._settings.webhook_allow_private,
                                     connect_timeout_s=self._settings.webhook_connect_timeout_s,
                                     timeout_s=self._settings.webhook_timeout_s)
                except TargetRefused as e:  # the name resolved to an address that may not be reached
                    got = Attempt(None, 0.0, error=f"refused: {e}")
                except OSError as e:  # the name did not resolve: the network's fault, maybe for a while
                    got = Attempt(None, 0.0, error=f"cannot resolve {endpoint.target.host}: {e}")
                except Exception as e:  # a fault of runledger's with this answer: retried as no answer, never looping
                    log.exception("delivering %s to %s failed in runledger's own code", msg_id, endpoint_id)
                    got = Attempt(None, 0.0, error=f"runledger failed: {type(e).__name__}: {e}")
        s = self._settings
        if got.error is not None and got.error.startswith("refused: "):
            following = Next("dead", why=f"{got.error}: not retried")
        else:
            following = after(got, number - replayed_after, s.webhook_retry_delays, jitter=s.webhook_retry_jitter,
                              retry_after_cap_s=s.webhook_retry_after_cap_s)
        metrics.WEBHOOK_ATTEMPTS.labels(following.outcome).inc()
        metrics.WEBHOOK_ATTEMPT_SECONDS.observe(got.seconds)
        if following.outcome == "delivered" and event_time is not None:
            metrics.WEBHOOK_DELIVERY_SECONDS.observe(max((datetime.now(UTC) - event_time).total_seconds(), 0.0))
        return Outcome(msg_id, endpoint_id, stream_id, number, number - replayed_after, at, got, following)


@dataclass(slots=True)
class _Pending:
    outcomes: Sequence[Outcome]
    done: asyncio.Future[set[str]]


class Recorder:
    """Writes outcomes in PostgreSQL, everything waiting in one transaction; ``record`` returns once they are
    written (tried again until PostgreSQL answers). ``published``: called after a commit that wrote copies to the
    outbox (it publishes them)."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, published: Callable[[], Awaitable[object]]) -> None:
        self._pool, self._settings, self._published = pool, settings, published
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._publishing: asyncio.Task[None] | None = None
        self._again = False

    async def record(self, outcomes: Sequence[Outcome]) -> set[str]:
        """Write ``outcomes``; returns the ids of the messages they moved (an attempt of a message that moved
        meanwhile, a duplicate, moves nothing and is not kept)."""
        if not outcomes:
            return set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        pending = _Pending(outcomes, asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        return await pending.done

    async def stop(self) -> None:
        for task in (self._task, self._publishing):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # One attempt per message: two copies of one retry attempted side by side (a copy published twice)
            # are one attempt, and the second would otherwise refuse the whole batch for ever (its primary key).
            first: dict[str, Outcome] = {}
            for o in (o for p in batch for o in p.outcomes):
                first.setdefault(o.msg_id, o)
            outcomes = list(first.values())
            pause = 0.2
            while True:
                try:
                    moved, copies = await self._write(outcomes)
                    break
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
                    log.warning("cannot record %d delivery attempts (%s); trying again in %.1f s: the messages "
                                "stay owed meanwhile", len(outcomes), database_error(e, "webhooks") or e, pause)
                    await asyncio.sleep(pause * (0.5 + random.random()))  # noqa: S311 - jitter
                    pause = min(pause * 2, 5.0)
            for p in batch:
                if not p.done.done():
                    p.done.set_result(moved)
            if copies:
                self._publish_soon()

    def _publish_soon(self) -> None:
        """Publish the outbox beside the recording, never in its way: a slow broker holds no attempt back (what
        is left is published by the next call, or the sweep)."""
        if self._publishing is not None and not self._publishing.done():
            self._again = True
            return

        async def publish() -> None:
            while True:
                self._again = False
                with contextlib.suppress(Exception):
                    await self._published()
                if not self._again:
                    return

        self._publishing = asyncio.create_task(publish())

    async def _write(self, outcomes: Sequence[Outcome]) -> tuple[set[str], int]:
        s = self._settings
        rows = list(zip(*((o.msg_id, o.number, o.endpoint_id, o.at, o.attempt.status,
                           round(o.attempt.seconds * 1000, 3), _text(o.attempt.response), o.attempt.error,
                           o.attempt.address, o.next.outcome,
                           o.at + timedelta(seconds=o.next.delay_s) if o.next.outcome == "retry" else None)
                          for o in outcomes), strict=True))
        health: dict[str, tuple[bool, datetime]] = {}
        for o in sorted(outcomes, key=lambda o: o.at):
            health[o.endpoint_id] = (o.next.outcome == "delivered", o.at)
        async with self._pool.acquire() as conn, conn.transaction():
            moved = {r["msg_id"] for r in await conn.fetch(query("webhook_record"), *rows)}
            copies = [self._copy(o) for o in outcomes if o.msg_id in moved and o.next.outcome != "delivered"]
            if copies:
                await conn.execute(query("webhook_outbox"), *map(list, zip(*copies, strict=True)))
            ids = list(health)
            await conn.execute(query("webhook_health"), ids, [ok for ok, _ in health.values()],
                               [at for _, at in health.values()])
            failing = [e for e, (ok, _) in health.items() if not ok]
            disabled = await conn.fetch(query("webhook_disable_failing"), failing, s.webhook_disable_after_s) \
                if failing else []
        for r in disabled:
            metrics.WEBHOOK_DISABLED.inc()
            log.error("webhook endpoint %s disabled: %s; `runledger webhooks enable %s` delivers what it missed",
                      r["endpoint_id"], r["disabled_reason"], r["endpoint_id"])
        return moved, len(copies)

    def _copy(self, o: Outcome) -> tuple[str, str, dict[str, str]]:
        prefix = self._settings.topic_prefix
        if o.next.outcome == "retry":
            delays = self._settings.webhook_retry_delays
            topic = webhook_retry_topic(prefix, delays[min(o.retry, len(delays)) - 1])
            headers = retry_headers(o.msg_id, o.endpoint_id, o.number + 1, o.at + timedelta(seconds=o.next.delay_s),
                                    o.next.why)
        else:
            topic = webhook_dlq_topic(prefix)
            headers = retry_headers(o.msg_id, o.endpoint_id, o.number, None, o.next.why)
        return o.msg_id, topic, headers


def _text(response: bytes) -> str | None:
    """The first KiB of an answer as text (PostgreSQL refuses U+0000 in text)."""
    return response.decode("utf-8", "replace").replace("\x00", "\ufffd") if response else None


class Dispatcher:
    """Sends what is owed on the log partitions ``partitions()`` returns, until cancelled; ``wake`` starts a round
    at once (new messages, a retry delivered)."""

    def __init__(self, pool: asyncpg.Pool, deliverer: Deliverer, recorder: Recorder,
                 partitions: Callable[[], set[int]], wake: asyncio.Event) -> None:
        self._pool, self._deliverer, self._recorder = pool, deliverer, recorder
        self._partitions, self.wake = partitions, wake
        self._sending: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._resting: dict[tuple[str, str], float] = {}  # until when (monotonic)

    async def run(self) -> None:
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_POLL_S):
                        await self.wake.wait()
                self.wake.clear()
                await self._round()
        finally:
            tasks = list(self._sending.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _round(self) -> None:
        partitions = self._partitions()
        if not partitions:
            return
        now = time.monotonic()
        self._resting = {pair: until for pair, until in self._resting.items() if until > now}
        busy = [*self._sending, *self._resting]
        try:
            rows = await self._pool.fetch(query("webhook_owed"), sorted(partitions), _OWED_LIMIT, _RUN_LIMIT,
                                          [e for e, _ in busy], [s for _, s in busy], _OWED_BYTES)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
            log.warning("cannot read the messages owed (%s); trying again", database_error(e, "webhooks") or e)
            await asyncio.sleep(1.0)
            return
        runs: defaultdict[tuple[str, str], list[asyncpg.Record]] = defaultdict(list)
        for r in rows:
            runs[(r["endpoint_id"], r["stream_id"])].append(r)
        for pair, run in runs.items():
            if pair not in self._sending:
                task = asyncio.create_task(self._send(run))
                self._sending[pair] = task
                task.add_done_callback(lambda _, pair=pair: self._done(pair))  # type: ignore[misc]

    def _done(self, pair: tuple[str, str]) -> None:
        self._sending.pop(pair, None)
        self.wake.set()

    async def _send(self, run: list[asyncpg.Record]) -> None:
        """One (endpoint, stream)'s messages in seq order, each after the one before was delivered; then recorded.
        A run that could make no attempt rests its (endpoint, stream) a while rather than come straight back."""
        outcomes: list[Outcome] = []
        pair = (run[0]["endpoint_id"], run[0]["stream_id"])
        try:
            for r in run:
                outcome = await self._deliverer.attempt(r["msg_id"], r["endpoint_id"], r["stream_id"],
                                                        bytes(r["body"]), r["attempts"] + 1, r["event_time"],
                                                        replayed_after=r["replayed_after"])
                if outcome is None:
                    break
                outcomes.append(outcome)
                if outcome.next.outcome != "delivered":
                    log.info("webhook %s to %s (%s seq %s): %s", r["msg_id"], r["endpoint_id"], r["stream_id"],
                             r["seq"], outcome.next.why)
                    break
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
            log.warning("cannot read endpoint %s (%s); its messages wait %.0f s", run[0]["endpoint_id"],
                        database_error(e, "webhooks") or e, _REST_S)
            self._resting[pair] = time.monotonic() + _REST_S
        except Exception:
            log.exception("sending to %s failed unexpectedly; its messages wait %.0f s", run[0]["endpoint_id"],
                          _REST_S)
            self._resting[pair] = time.monotonic() + _REST_S
        await self._recorder.record(outcomes)
