"""The Faust application of a projection worker: ``create_app(settings)``.

Kafka consumer tasks (``runledger.streams.worker.consumer``), one for the log and one per retry
topic, read whole batches and send each through an in-memory channel to the
``project`` agent, which applies it in one PostgreSQL transaction
(``runledger.streams.worker.outbox.BatchHandler``) and answers with the result; only then does
the consumer commit. A Faust agent reading records one by one manages about
7,000 records/s on two cores; batches through a channel keep the agent thin and
the path fast, and the consumers own their commits, so that no cancellation
acknowledges a record that was not applied.

Three more tasks: one publishes what the outbox still holds (copies a crashed
worker did not send) every few seconds, one publishes batches that producers
staged but did not publish (``EventProducer.sweep``), and one keeps this
worker's row in ``workers`` fresh so that ``runledger wait`` and ``runledger dev
status`` know it is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import faust
from faust.app.base import BootStrategy

from runledger.projections.planner import Decoded
from runledger.projections.postgres.db import connect, connect_one, database_error, pending_migrations
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.store import ProjectionStore
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import BatchResult, LogRecord
from runledger.schemas.errors import PermanentError, TransientError
from runledger.streams import metrics
from runledger.streams.kafka import client_options
from runledger.streams.producer.client import EventProducer
from runledger.streams.runtime import run_together, tune_gc
from runledger.streams.settings import Settings
from runledger.streams.tools.checkpoints import checkpoint_signer, sign_if_due
from runledger.streams.tools.signer import LogSigner
from runledger.streams.worker.consumer import LogConsumer, Projector, RetryConsumer
from runledger.streams.worker.outbox import BatchHandler, Forwarder
from runledger.streams.worker.retry import RetrySchedule, delay_name

__all__ = ["HEARTBEAT_S", "SchemaNotMigrated", "check_schema", "create_app", "faust_app", "worker_pool"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
_SWEEP_S = 5.0


class SchemaNotMigrated(PermanentError):
    """The worker's schema lacks migrations, which its login cannot apply: run ``runledger db migrate`` (the
    owner's login) first; compose.yaml's migrate service does before any worker starts."""

    code = "schema_not_migrated"


@dataclass
class _Work:
    records: list[LogRecord] | list[Decoded]
    done: asyncio.Future[BatchResult | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Ready:
    pool: asyncpg.Pool
    handler: BatchHandler
    log_consumer: LogConsumer
    signers: dict[str, LogSigner] = field(default_factory=dict)  # by key: each keeps what it read between rounds


async def worker_pool(settings: Settings, *, max_size: int = 4) -> asyncpg.Pool:
    """The worker's connections: its own login (runledger_worker), a member of no role it could SET ROLE to, never
    the owner's, with the bounds of ``Settings.db_session``; ``check_schema`` has found the schema migrated before
    the app starts."""
    return await connect(settings.database_dsn("worker"), settings.db_schema, max_size=max_size,
                         session=settings.db_session)


async def check_schema(settings: Settings) -> None:
    """Before a worker starts: its login connects, and its schema holds every migration (a worker applies none).
    Raises SchemaNotMigrated or StoreUnavailable."""
    conn = await connect_one(settings.database_dsn("worker"), settings.db_schema)
    try:
        pending = await pending_migrations(conn)
    finally:
        await conn.close()
    if pending:
        raise SchemaNotMigrated(f"schema {settings.db_schema} lacks migrations {', '.join(pending)}: apply them with "
                                "`runledger db migrate` (as the owner) before starting workers")


def create_app(settings: Settings, *, metrics_url: str | None = None) -> faust.App:
    """A Faust app whose agent projects the log, and its retry topics, into ``settings.db_schema``.
    ``metrics_url``: where this process serves its metrics, recorded with its heartbeat."""
    app = faust_app(settings, "worker")
    schedule = RetrySchedule(settings.topic_prefix, settings.retry_delays)
    channel = app.channel()
    ready: asyncio.Future[_Ready] = asyncio.Future(loop=app.loop)

    @app.agent(channel)
    async def project(works: Any) -> None:
        handler = (await ready).handler
        async for work in works:
            try:
                work.done.set_result(await handler.handle(work.records))
            except Exception as e:  # noqa: BLE001 - handed to the consumer task, which must not wait forever
                work.done.set_exception(e)

    async def send(records: list[LogRecord] | list[Decoded]) -> BatchResult | None:
        work = _Work(records)
        await channel.put(work)  # type: ignore[arg-type]  # a channel carries any object, typed for events
        return await work.done

    # Faust names each task, timer and agent after its function: these closures keep the names (and what they
    # share: settings, ready, send), the helpers below do the work.
    @app.task
    async def consume() -> None:
        app.flow_control.resume()  # Faust's consumer would, once assigned; without it, the channel waits forever
        await _consume(settings, schedule, ready, send)

    @app.timer(_SWEEP_S)
    async def sweep_outbox() -> None:
        if ready.done():
            await (await ready).handler.publish()
            await _read_gauges((await ready).pool)

    @app.timer(settings.checkpoint_interval_s or 3600.0)
    async def sign_checkpoints() -> None:
        if settings.checkpoint_interval_s and ready.done():
            await _sign_checkpoint(settings, await ready)

    @app.task
    async def sweep_staged() -> None:
        await _sweep_staged(settings)

    @app.task
    async def heartbeat() -> None:
        await _heartbeat(settings, ready, metrics_url)

    return app


class _OwnConsumers(BootStrategy):
    """Faust without its Kafka consumer. The worker reads the log and the retry topics with consumers of its
    own (``consumer.py``); Faust's would only join a group of its own (for its leader topic) and hold every
    task back until that group has settled, which the embedded broker's coordinator sometimes never lets
    happen after members leave (a worker then never starts). Agents, tasks, timers and the channel run
    without it."""

    enable_kafka_consumer = False


class _WorkerApp(faust.App):
    BootStrategy = _OwnConsumers


def _faust_credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """Faust's clients log in as the worker's own (``client_options``)."""
    options = client_options(settings)
    if "sasl_mechanism" in options:
        return faust.SASLCredentials(username=options["sasl_plain_username"], password=options["sasl_plain_password"],
                                     ssl_context=options.get("ssl_context"), mechanism=options["sasl_mechanism"])
    return faust.SSLCredentials(options["ssl_context"]) if "ssl_context" in options else None


def faust_app(settings: Settings, role: str) -> faust.App:
    """A Faust app of a worker (``role``: worker, webhooks) without Faust's own consumer, logged in as the
    worker."""
    return _WorkerApp(
        f"{settings.topic_prefix}-{role}",
        broker=f"kafka://{settings.kafka_bootstrap_servers.split(',')[0]}",
        broker_credentials=_faust_credentials(settings),
        web_enabled=False,
        producer_acks=-1,
        topic_replication_factor=1,
        topic_partitions=settings.event_partitions,
        topic_allow_declare=True,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=2.0,
        broker_rebalance_timeout=10.0,
        datadir=str(settings.state_dir / ("faust" if role == "worker" else f"faust-{role}")),
    )


async def _consume(settings: Settings, schedule: RetrySchedule, ready: asyncio.Future[_Ready],
                   send: Projector) -> None:
    """Set up the store and the outbox, make them ``ready`` for the agent, then run the consumers of the log
    and of each retry topic, which hand their batches to the agent through ``send``."""
    pool = await worker_pool(settings)
    catalog = load_tokencost_catalog()
    await ProjectionStore.save_catalog(pool, catalog)
    store = ProjectionStore(pool, catalog, settings.consumer_group, max_attempts=schedule.max_attempts,
                            after_locks=_stop_once() if settings.test_stop_after_locks else None)
    # The outbox is published on a connection of its own: a slow broker never holds one the batches, the heartbeat
    # or the signer need.
    outbox_pool = await worker_pool(settings, max_size=1)
    kafka = client_options(settings)
    forwarder = Forwarder(kafka, schedule, settings.db_schema)
    await forwarder.start()
    log_consumer = LogConsumer(kafka, settings.events_topic, settings.consumer_group,
                               store, pool, send, session_timeout_s=settings.worker_session_timeout_s)
    ready.set_result(_Ready(pool, BatchHandler(store, forwarder, outbox_pool), log_consumer))
    tune_gc()
    retries = [RetryConsumer(kafka, topic, delay,
                             f"{settings.consumer_group}.retry.{delay_name(delay)}", send,
                             session_timeout_s=settings.worker_session_timeout_s)
               for delay, topic in schedule.topics]
    try:
        await run_together([log_consumer.run(), *(r.run() for r in retries)])
    finally:
        for log_signer in ready.result().signers.values():
            await log_signer.stop()
        await forwarder.stop()
        await outbox_pool.close()
        await pool.close()


def _stop_once() -> Callable[[], Awaitable[None]]:
    """``Settings.test_stop_after_locks``: the first batch to hold its locks stops this process (SIGSTOP) before
    it commits, as a VM freeze or a partition would; SIGCONT resumes it."""
    stopped = False

    async def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            log.warning("RUNLEDGER_TEST_STOP_AFTER_LOCKS: stopping this process (SIGSTOP) with its batch's locks held")
            os.kill(os.getpid(), signal.SIGSTOP)

    return stop


async def _sweep_staged(settings: Settings) -> None:
    """Batches a producer staged but did not publish (it failed or died) reach the log without waiting for
    another append to their stream: the producer's own sweeper publishes them."""
    if settings.producer_sweep_s <= 0:
        return
    while True:
        try:
            async with EventProducer(settings):
                await asyncio.Future()  # until the worker stops
        except TransientError as e:
            log.warning("cannot sweep staged batches: %s; trying again in 5 s", e)
            await asyncio.sleep(5)


async def _sign_checkpoint(settings: Settings, ready: _Ready) -> None:
    """A signer round if one is due (one worker per interval, ``runledger.streams.tools.signer``). Without a key
    the timer does nothing and says so once; a key that cannot be used is logged and counted
    (``runledger_signer_key_errors_total``) at every interval, and read again at the next. Nothing here stops the
    worker."""
    try:
        signer = checkpoint_signer(settings)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the key stops the signing, never the worker
        reason = "unreadable" if isinstance(e, OSError) else "invalid"
        metrics.SIGNER_KEY_ERRORS.labels(reason).inc()
        log.error("the checkpoint key %s cannot be used (%s: %s): no checkpoint is signed; reading it again in "
                  "%.0f s", settings.checkpoint_key_path, type(e).__name__, e, settings.checkpoint_interval_s)
        return
    if signer is None:
        _warn_unsigned(f"no checkpoint key at {settings.checkpoint_key_path}")
        return
    try:
        log_signer = ready.signers.get(signer.private_key)
        if log_signer is None:  # one per worker and key: a round reads only what was published and appended since
            log_signer = LogSigner(settings, signer)
            await log_signer.start()
            ready.signers[signer.private_key] = log_signer
        done = await sign_if_due(log_signer, ready.pool,
                                 settings.checkpoint_interval_s * 0.9)  # the timer's jitter must not skip one
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TransientError) as e:
        log.warning("signing checkpoints: %s; trying at the next interval", database_error(e, "checkpoint") or e)
        return
    except Exception:  # noqa: BLE001 - a bug in the signer must not stop projecting
        log.exception("signing checkpoints failed; trying at the next interval")
        return
    for s in done.signed if done is not None else ():
        log.info("signed %s at size %d", s.checkpoint.origin, s.checkpoint.size)


@functools.cache
def _warn_unsigned(why: str) -> None:
    log.warning("%s: checkpoints are not signed on an interval (`runledger keys init`)", why)


async def _read_gauges(pool: asyncpg.Pool) -> None:
    """The metrics read from PostgreSQL: outbox, dead letters, replays, the tree and its checkpoints."""
    try:
        metrics.observe_state(await pool.fetchrow(query("metrics_state")))
    except Exception as e:  # noqa: BLE001 - stale gauges are no reason to stop projecting
        log.warning("cannot read the metrics kept in PostgreSQL: %s", database_error(e, "metrics") or e)


async def _heartbeat(settings: Settings, ready: asyncio.Future[_Ready], metrics_url: str | None) -> None:
    """Keep this worker's row in ``workers`` fresh, with the partitions it holds, until the worker stops."""
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    started = datetime.now(UTC)
    state = await ready
    try:
        while True:
            try:
                await state.pool.execute(query("worker_seen"), worker_id, settings.consumer_group,
                                         socket.gethostname(), os.getpid(), started,
                                         sorted(state.log_consumer.assigned), metrics_url)
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is no reason to stop projecting
                log.warning("cannot record this worker as alive: %s", database_error(e, "heartbeat") or e)
            await asyncio.sleep(HEARTBEAT_S)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(state.pool.execute(query("worker_gone"), worker_id))
