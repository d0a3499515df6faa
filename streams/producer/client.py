"""``EventProducer``: append events to a stream's hash chain and publish them to the log.

Assigns ``seq`` and ``prevhash``, hashes, validates against the spec, and
publishes to ``<prefix>.events`` keyed by stream id, one stream's events in
``seq`` order. Chain heads are coordinated in Redis (``runledger.streams.producer.heads``) so
that any number of producers, in any number of processes, never fork a chain
or reuse a ``seq``. The events themselves are checked and chained without I/O in
``runledger.streams.producer.events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
)
from redis.asyncio import Redis
from redis.exceptions import RedisError
from tqdm import tqdm

from runledger.schemas.chain import Head
from runledger.schemas.errors import InvalidEvent, PermanentError, TransientError
from runledger.schemas.lifecycle import check_lifecycle
from runledger.streams import metrics
from runledger.streams.kafka import client_options
from runledger.streams.producer.buckets import Admission, RateLimited
from runledger.streams.producer.chained import ChainConflict, chain_batch, check_chained
from runledger.streams.producer.epoch import HeadsRecovering, redis_errors
from runledger.streams.producer.events import NewEvent, build_events, check_new_events
from runledger.streams.producer.heads import AppendRef, StagedBatch, StreamBusy, StreamHeads, StreamState
from runledger.streams.producer.publish import CHUNK_BYTES, LogPublisher, PublishFailed, PublishRefused
from runledger.streams.producer.recovery import recover_heads
from runledger.streams.producer.sweeper import Sweeper
from runledger.streams.settings import Settings, redact_url
from runledger.streams.topics import ensure_topics

if TYPE_CHECKING:
    from runledger.projections.postgres.wait import WaitResult

__all__ = ["AppendConflict", "Appended", "ChainConflict", "EventProducer", "PublishFailed", "PublishRefused",
           "append_many"]

log = logging.getLogger(__name__)

class AppendConflict(PermanentError):
    """``expected_seq`` did not match the stream's head: someone else appended first.

    Re-read the stream, decide again, and append with the new ``expected_seq``.
    """

    code = "append_conflict"

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        self.stream_id, self.expected, self.actual = stream_id, expected, actual
        super().__init__(f"stream {stream_id!r}: expected_seq {expected}, but the stream is at seq {actual}")


class PublishPending(PublishFailed):
    """This append's own batch is staged but the broker did not acknowledge it: it is not lost, and will be in the
    log (the sweeper, or the next append to the stream, publishes it) as ``appended`` says, ids, seqs and hashes.
    A caller that must not answer "failed" for an append that lands later (``runledger serve``) answers with
    these; retrying with the same idempotency keys returns them too."""

    code = "publish_pending"

    def __init__(self, message: str, appended: list[Appended]) -> None:
        self.appended = appended
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Appended:
    """An event in the log. ``duplicate``: an earlier append with the same idempotency key made it."""

    stream_id: str
    seq: int
    id: str
    hash: str
    duplicate: bool = False
    value: bytes = field(default=b"", repr=False)


_Plan = Callable[[StreamState], tuple[StagedBatch, list[Appended]]]
"""Under a stream's lease, from its state: the batch to publish (no refs: nothing) and the answer to the append."""


class EventProducer:
    """Appends events to streams. Use ``async with EventProducer(settings) as producer:``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._redis = Redis.from_url(settings.redis_dsn)
        self._heads = StreamHeads(self._redis, settings.topic_prefix, settings.producer_lease_ms)
        self._kafka = AIOKafkaProducer(
            **client_options(settings),
            acks="all",
            # Idempotent producers need InitProducerId, which Tansu refuses; order per stream comes
            # from the lease instead (one batch of a stream in flight at a time).
            enable_idempotence=False,
            max_batch_size=CHUNK_BYTES * 2,
            linger_ms=0,
        )
        self._publisher = LogPublisher(self._kafka, self._heads, settings)
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await ensure_topics(self._settings, {self._settings.events_topic: self._settings.event_partitions})
        try:
            await self._kafka.start()
        except KafkaError as e:
            raise TransientError(f"cannot reach Kafka at {self._settings.kafka_bootstrap_servers}: {e}") from e
        try:
            with redis_errors(f"cannot reach Redis at {redact_url(self._settings.redis_url)}"):
                await self._redis.ping()
        except TransientError:
            await self._kafka.stop()
            raise
        if self._settings.producer_sweep_s > 0:
            self._sweeper = asyncio.create_task(Sweeper(self._redis, self._settings, self.sweep).run())

    async def stop(self) -> None:
        if self._sweeper is not None:
            await _cancel(self._sweeper)
        await self._kafka.stop()
        with contextlib.suppress(RedisError):
            await self._redis.aclose()

    async def ready(self, timeout: float = 2.0) -> dict[str, str | None]:
        """Whether Kafka and Redis answer now, within ``timeout`` seconds each: ``{"kafka": None, "redis": None}``
        when both do, else the reason in place of None (``runledger serve``'s /readyz)."""
        out: dict[str, str | None] = {}
        client = self._kafka.client
        try:
            # The log topic's metadata only: the whole cluster's costs a broker with many topics (and this process:
            # 4 ms of CPU for 106 topics) at every probe.
            client.add_topic(self._settings.events_topic)
            if not await asyncio.wait_for(client.force_metadata_update(), timeout):
                raise KafkaError("no broker answered a metadata request")
            out["kafka"] = None
        except (KafkaError, TimeoutError, OSError) as e:
            out["kafka"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        try:
            await asyncio.wait_for(self._redis.ping(), timeout)
            out["redis"] = None
        except (RedisError, TimeoutError, OSError) as e:
            out["redis"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return out

    async def __aenter__(self) -> EventProducer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def append(self, stream_id: str, type: str, data: Mapping[str, Any], *,  # noqa: A002
                     expected_seq: int | None = None, idempotency_key: str | None = None,
                     time: datetime | None = None, source: str | None = None) -> Appended:
        """Append one event; see ``append_batch``."""
        [appended] = await self.append_batch(
            stream_id, [NewEvent(type, data, idempotency_key, time)], expected_seq=expected_seq, source=source)
        return appended

    async def append_batch(self, stream_id: str, events: Sequence[NewEvent], *,
                           expected_seq: int | None = None, source: str | None = None,
                           admission: Admission | None = None) -> list[Appended]:
        """Append ``events`` to ``stream_id`` as consecutive seqs, all or nothing.

        ``expected_seq``: the seq the stream must be at now (0: the stream must be
        new), else AppendConflict. Events whose idempotency key was appended before
        are not appended again: their earlier result comes back with
        ``duplicate=True``. Raises InvalidEvent/UnknownType/TooLarge or IllegalTransition
        (a first event that is not ``execution.started``, an event after a terminal one: nothing
        published), AppendConflict, or a TransientError (StreamBusy, LeaseLost, PublishFailed, HeadsRecovering:
        Redis lost its heads and their recovery did not end within RUNLEDGER_PRODUCER_WAIT_S, or a Redis error).

        ``source``: the CloudEvents ``source`` of the events (default: RUNLEDGER_PRODUCER_SOURCE); ``serve`` sets
        it from the credential of the request, so that no producer writes as another. ``admission``: a token bucket
        to take from with the stream's lease (``serve``'s rate limit), else RateLimited, nothing appended.
        """
        keys = [e.idempotency_key for e in events if e.idempotency_key is not None]
        src = self._settings.producer_source if source is None else source

        def plan(state: StreamState) -> tuple[StagedBatch, list[Appended]]:
            head, last_type, known = state.head, state.last_type, state.known
            fresh = [e for e in events if e.idempotency_key not in known]
            if fresh and expected_seq is not None and expected_seq != head.seq:
                raise AppendConflict(stream_id, expected_seq, head.seq)
            check_lifecycle(stream_id, head.seq, last_type or None, [e.type for e in fresh])
            batch = build_events(src, stream_id, head, fresh)
            return batch, _answers(stream_id, [e.idempotency_key for e in events], known, batch)

        return await self._counted(stream_id, len(events), keys, plan, lambda: check_new_events(stream_id, events),
                                   admission)

    async def append_chained(self, stream_id: str, events: Sequence[Mapping[str, Any]],
                             idempotency_keys: Sequence[str | None] | None = None, *,
                             admission: Admission | None = None) -> list[Appended]:
        """Publish events that already carry their ``seq``, ``prevhash`` and ``hash`` (chained by their producer)
        as they are, all or nothing, if they link to the stream's head.

        Each event is validated in full (``parse_event``: its hash must verify) and must be of ``stream_id``; under
        the stream's lease, the first one not appended before must have seq head + 1 and prevhash the head's hash,
        and each next one link to it. ``idempotency_keys`` (one per event, or None): an event whose key was
        appended before is answered with its earlier result (``duplicate=True``), not published again. Raises
        InvalidEvent/UnknownType/TooLarge/HashMismatch, ChainConflict (does not link: nothing published),
        IllegalTransition, or a TransientError as ``append_batch`` does (``admission`` too).
        """
        given = list(idempotency_keys) if idempotency_keys is not None else [None] * len(events)
        if len(given) != len(events):
            raise ValueError("one idempotency key (or None) per event")
        keys = [k for k in given if k is not None]
        values: list[bytes] = []

        def check() -> None:
            if len(keys) != len(set(keys)):
                raise InvalidEvent([("idempotency_key", "repeated within one batch")])
            values.extend(check_chained(stream_id, events))

        def plan(state: StreamState) -> tuple[StagedBatch, list[Appended]]:
            fresh = [(e, v, k) for e, v, k in zip(events, values, given, strict=True) if k not in state.known]
            batch = chain_batch(stream_id, state.head, state.last_type, fresh)
            return batch, _answers(stream_id, given, state.known, batch)

        return await self._counted(stream_id, len(events), keys, plan, check, admission)

    async def _counted(self, stream_id: str, count: int, keys: list[str], plan: _Plan,
                       check: Callable[[], None], admission: Admission | None) -> list[Appended]:
        """The append of ``count`` events, ``check``ed first, then under the stream's lease; timed and counted by
        outcome."""
        started = time.perf_counter()
        try:
            check()
            out = await self._append_batch(stream_id, keys, plan, admission) if count else []
        except (PermanentError, TransientError) as e:
            metrics.APPENDS.labels("refused" if isinstance(e, PermanentError | RateLimited) else "failed").inc(count)
            raise
        except RedisError as e:  # Redis went away mid-append: what was staged is published by the sweeper
            metrics.APPENDS.labels("failed").inc(count)
            raise TransientError(f"Redis failed during the append to {stream_id} ({type(e).__name__}: {e}); "
                                 "append again with the same idempotency keys") from e
        finally:
            metrics.APPEND_SECONDS.observe(time.perf_counter() - started)
        duplicates = sum(a.duplicate for a in out)
        metrics.APPENDS.labels("appended").inc(len(out) - duplicates)
        metrics.APPENDS.labels("duplicate").inc(duplicates)
        return out

    async def _append_batch(self, stream_id: str, keys: list[str], plan: _Plan,
                            admission: Admission | None) -> list[Appended]:
        """Take the stream's lease (and ``admission``'s tokens, once), read its state (and the idempotency ``keys``
        known), let ``plan`` make the batch and the answer from it, and stage, publish and commit the batch."""
        token, deadline = uuid.uuid4().hex, time.monotonic() + self._settings.producer_wait_s
        for _ in range(3):
            state = await self._heads.acquire_read(stream_id, token, max(0.0, deadline - time.monotonic()), keys,
                                                   admission)
            admission = None  # taken: a retry after a recovery takes none again
            lease = _Lease()
            try:
                if state.complete:
                    done = await self._append_leased(stream_id, token, state, keys, plan, lease, deadline)
                    if done is not None:
                        return done
            finally:
                if not lease.released:
                    try:
                        await self._heads.release(stream_id, token)
                    except (RedisError, TransientError):
                        if not lease.appended:
                            raise
                        # The append is in the log; Redis failed after it: the lease expires by itself.
            # Redis lost its heads, or restarted between the read and the stage: a head proves nothing until
            # they are recovered. Nothing of this append was staged.
            await self._recover(deadline)
        raise HeadsRecovering(f"stream {stream_id!r}: Redis lost its chain heads again while they were recovered; "
                              "nothing was appended")

    async def _append_leased(self, stream_id: str, token: str, state: StreamState, keys: list[str],
                             plan: _Plan, lease: _Lease, deadline: float) -> list[Appended] | None:
        """The append under the stream's lease, from ``state``; None if the epoch changed before the batch was
        staged (nothing of this append published). ``lease`` says whether the append is in the log, and whether its
        commit released the lease already (no round trip to release it again)."""
        if state.left_behind is not None:
            try:
                await self._publisher.publish(stream_id, state.left_behind)
                await self._heads.commit(stream_id, "", state.left_behind)
            except PublishRefused as e:  # another producer's batch, never acknowledged to anyone: dropped
                log.error("%s", e)
            state = await self._heads.read(stream_id, keys)
            if not state.complete:
                return None
        batch, out = plan(state)
        if batch.refs:
            if not await self._stage(stream_id, token, batch, deadline):
                return None
            try:
                await self._publisher.publish(stream_id, batch)
            except PublishFailed as e:  # staged: it will be in the log, with these ids, seqs and hashes
                raise PublishPending(str(e), out) from e
            lease.appended = True
            try:
                await self._heads.commit(stream_id, token, batch)
                lease.released = True  # the commit dropped it
            except (RedisError, TransientError) as e:
                # In the log already: the append is done. The batch stays staged; the sweeper or the next append
                # publishes it again (the same records: readers keep one per seq) and commits it.
                log.warning("stream %r: seq %d..%d are in the log, but their head was not committed (%s): the "
                            "sweeper will", stream_id, batch.refs[0].seq, batch.refs[-1].seq, e)
        return out

    async def _stage(self, stream_id: str, token: str, batch: StagedBatch, deadline: float) -> bool:
        """``StreamHeads.stage``, asked again while Redis fails, until ``deadline``: a stage whose reply was lost
        (Redis stopped, the connection broke) may have staged the batch, which the sweeper would then publish
        whatever this append answered. Asked again, it says whether it did."""
        pause = 0.05
        while True:
            try:
                return await self._heads.stage(stream_id, token, batch)
            except RedisError:
                if time.monotonic() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def precheck(self, stream_id: str, events: Sequence[NewEvent]) -> None:
        """Raise IllegalTransition now if ``events`` could not follow the stream's head as it is: a check before
        a multi-stream append publishes anything (``append_batch`` checks again under the stream's lease)."""
        keys = [e.idempotency_key for e in events if e.idempotency_key is not None]
        with redis_errors(f"checking the head of {stream_id!r}"):
            state = await self._heads.read(stream_id, keys)
            if not state.complete:
                await self._recover(time.monotonic() + self._settings.producer_wait_s)
                state = await self._heads.read(stream_id, keys)
        head, last_type, left_behind = state.head, state.last_type, state.left_behind
        seen = set(state.known)
        if left_behind is not None:  # published before anything else
            head, last_type = Head(left_behind.refs[-1].seq, left_behind.refs[-1].hash), left_behind.last_type
            seen.update(k for k in left_behind.idempotency_keys if k is not None)
        fresh = []
        for e in events:  # a key seen before is answered as a duplicate, not appended
            if e.idempotency_key is None or e.idempotency_key not in seen:
                fresh.append(e.type)
            if e.idempotency_key is not None:
                seen.add(e.idempotency_key)
        check_lifecycle(stream_id, head.seq, last_type or None, fresh)

    async def _recover(self, deadline: float) -> None:
        done = await recover_heads(self._redis, self._settings, deadline=deadline)
        if done is not None and done.records:
            log.warning("Redis had lost its chain heads: recovered them from the log (%d records read from the "
                        "heads' checkpoints, %d streams, %d heads moved forward)", done.records, len(done.streams),
                        len(done.moved))

    async def wait_projected(self, appended: Appended, *, timeout: float = 30.0) -> WaitResult:
        """Read-your-writes: return once ``appended`` is projected (``status`` "projected"), rejected
        (``reason`` says why), or ``timeout`` seconds have passed (``status`` "timeout")."""
        # Imported here: a producer that never waits never loads the PostgreSQL side (asyncpg).
        from runledger.projections.postgres.wait import wait_projected

        # As the producers' own login: read-only, where an event is and never what it holds.
        return await wait_projected(self._settings.database_dsn("producer"), self._settings.db_schema,
                                    appended.stream_id, appended.seq, event_id=appended.id, timeout=timeout,
                                    group_id=self._settings.consumer_group, topic=self._settings.events_topic)

    async def sweep(self) -> list[tuple[str, int, int]]:
        """Publish every batch left staged by a producer that failed or died, whose lease has expired, without
        waiting for the next append to its stream. Returns (stream, first seq, last seq) of each published."""
        done = []
        with redis_errors("sweeping staged batches"):
            for stream_id in await self._heads.staged_streams():
                token = uuid.uuid4().hex
                try:
                    await self._heads.acquire(stream_id, token, 0)
                except StreamBusy:
                    continue  # a producer at work, or a lease not expired yet: the next sweep
                try:
                    left_behind = (await self._heads.read(stream_id, [])).left_behind
                    if left_behind is None:
                        await self._heads.discard(stream_id, "")  # nothing staged: the stream leaves the set
                        continue
                    try:
                        await self._publisher.publish(stream_id, left_behind)
                    except PublishRefused as e:
                        log.error("%s", e)
                        continue
                    await self._heads.commit(stream_id, "", left_behind)
                    done.append((stream_id, left_behind.refs[0].seq, left_behind.refs[-1].seq))
                    log.warning("published seq %d..%d of stream %r, left staged by a producer that failed or died",
                                left_behind.refs[0].seq, left_behind.refs[-1].seq, stream_id)
                finally:
                    await self._heads.release(stream_id, token)
        return done


@dataclass(slots=True)
class _Lease:
    """Where an append under a stream's lease got: its events in the log; the lease released by the commit."""

    appended: bool = False
    released: bool = False


def _answers(stream_id: str, keys: Sequence[str | None], known: Mapping[str, AppendRef],
             batch: StagedBatch) -> list[Appended]:
    """What an append answers, event by event (``keys``: each one's idempotency key): the earlier result of a key
    ``known`` before (a duplicate), else the next event of ``batch``."""
    made = iter(zip(batch.refs, batch.values, strict=True))
    out = []
    for key in keys:
        if key is not None and key in known:
            ref = known[key]
            out.append(Appended(stream_id, ref.seq, ref.id, ref.hash, duplicate=True))
        else:
            ref, value = next(made)
            out.append(Appended(stream_id, ref.seq, ref.id, ref.hash, value=value))
    return out


_SWEEPER_GRACE_S = 5.0


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it, cancelling again each grace period: aiokafka can swallow a cancellation
    (a sweeper round starting its consumer while the broker is down), and a stop must never wait for ever. After
    three, it is left to end with the loop, and said so."""
    for _ in range(3):
        task.cancel()
        if (await asyncio.wait({task}, timeout=_SWEEPER_GRACE_S))[0]:
            with contextlib.suppress(asyncio.CancelledError):
                task.result()
            return
    log.error("the producer's sweeper did not stop within %.0f s; left to end with the process", 3 * _SWEEPER_GRACE_S)


def _batches(events: list[NewEvent], size: int = 1000) -> Iterator[list[NewEvent]]:
    """Consecutive batches of at most ``size``; a repeated idempotency key starts a new batch,
    so that the repeat is answered as a duplicate of the first."""
    batch: list[NewEvent] = []
    keys: set[str] = set()
    for event in events:
        if len(batch) >= size or (event.idempotency_key is not None and event.idempotency_key in keys):
            yield batch
            batch, keys = [], set()
        batch.append(event)
        if event.idempotency_key is not None:
            keys.add(event.idempotency_key)
    if batch:
        yield batch


async def append_many(settings: Settings, items: Sequence[tuple[str, NewEvent]], *,
                      on_appended: Callable[[Appended], None] | None = None, progress: bool = True,
                      concurrency: int = 16) -> int:
    """Append ``items`` (stream id, event) in order per stream, streams concurrently, with a progress
    bar on stderr. Returns the number of streams."""
    by_stream: dict[str, list[NewEvent]] = {}
    for stream_id, event in items:
        by_stream.setdefault(stream_id, []).append(event)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(items), unit="ev", desc="appending", disable=None if progress else True, file=sys.stderr)
    async with EventProducer(settings) as producer:
        for stream_id, events in by_stream.items():  # one refused stream, and nothing is published
            await producer.precheck(stream_id, events)

        async def one(stream_id: str, events: list[NewEvent]) -> None:
            async with gate:
                for batch in _batches(events):
                    for appended in await producer.append_batch(stream_id, batch):
                        if on_appended is not None:
                            on_appended(appended)
                    bar.update(len(batch))
        await asyncio.gather(*(one(s, e) for s, e in by_stream.items()))
    bar.close()
    return len(by_stream)
