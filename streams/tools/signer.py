"""The signer: one C2SP tlog-checkpoint per partition of the log topic, of a root it derived from Kafka itself.

Its state is the checkpoints topic: every checkpoint it signed, each published with the tree's compact frontier
(a header, used only if it folds to the signed root). A round reads what was published since, extends each
partition's tree from its newest signed frontier with the partition's new records (read from Kafka, never from
PostgreSQL), and signs the partitions that grew, all published together. It never signs a checkpoint that
contradicts one signed before (``SignedLog``); a partition whose log does is refused, logged and reported.

PostgreSQL's copy of each tree (``runledger.projections.postgres.trees``) is compared with what was derived: a
disagreement is signed over with the log's version, recorded in ``tree_findings``, counted in
``runledger_tree_disagreements_total{partition}`` (an alert) and logged, naming partition and leaf.

Run by ``runledger signer`` (a process of its own), ``runledger checkpoint`` (one round now), or on a worker's
checkpoint timer (one worker per interval, picked by an advisory lock).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from runledger.projections.postgres.queries import query
from runledger.projections.postgres.trees import StoredTree, stored_trees
from runledger.schemas.checkpoint import Checkpoint, CheckpointError, Signer, Verifier
from runledger.schemas.errors import TransientError
from runledger.schemas.logtrees import FRONTIER_HEADER, Frontier, Refused, SignedLog, origin_of, partition_of
from runledger.streams import metrics
from runledger.streams.kafka import client_options, read_to_end, stop_consumer
from runledger.streams.settings import Settings
from runledger.streams.topics import ensure_topics

__all__ = ["LogSigner", "Round", "Signed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Signed:
    """A checkpoint signed and published in a round."""

    partition: int
    checkpoint: Checkpoint
    note: str


@dataclass(slots=True)
class Round:
    """What a round did: checkpoints signed, partitions refused (why), and disagreements with PostgreSQL."""

    signed: list[Signed] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    findings: list[tuple[int, int | None, int | None, str]] = field(default_factory=list)  # partition, leaf, offset


_COMPARED_LEAVES = 100_000
"""Of the leaves a round reads, at most this many (the last below PostgreSQL's size) are compared one by one with
PostgreSQL's; the root at PostgreSQL's size covers the rest."""


@dataclass(slots=True)
class _Derived:
    """What a round read of one partition, for comparing PostgreSQL's tree (``stored``) with it: the root at the
    stored size, if the round's tree passed it, and the last leaves read below it (index -> leaf hash)."""

    stored: StoredTree | None
    root_at_stored: bytes | None = None
    leaves: dict[int, tuple[bytes, int]] = field(default_factory=dict)  # index -> (leaf hash, offset)

    def passed(self, signed_log: SignedLog) -> None:
        if self.stored is not None and signed_log.tree.size == self.stored.size:
            self.root_at_stored = signed_log.tree.root()

    def read(self, index: int, leaf: bytes, offset: int, signed_log: SignedLog) -> None:
        if self.stored is None or index >= self.stored.size:
            return
        if index >= self.stored.size - _COMPARED_LEAVES:
            self.leaves[index] = (leaf, offset)
        self.passed(signed_log)


class LogSigner:
    """Signs the log topic's per-partition trees with ``signer``; ``start``, then ``round`` as often as due."""

    def __init__(self, settings: Settings, signer: Signer) -> None:
        self.settings, self.signer = settings, signer
        self._verifier = Verifier(signer.verifier_key)
        self.logs: dict[int, SignedLog] = {}
        self._checkpoints_read: dict[int, int] = {}  # partition of the checkpoints topic -> offset read to
        servers = client_options(settings)
        self._consumer = AIOKafkaConsumer(**servers, group_id=None, enable_auto_commit=False,
                                          auto_offset_reset="none", max_partition_fetch_bytes=4 * 1024 * 1024)
        self._producer = AIOKafkaProducer(**servers, acks="all", enable_idempotence=False, linger_ms=5)

    async def start(self) -> None:
        await ensure_topics(self.settings, {self.settings.checkpoints_topic: 1})
        try:
            await self._consumer.start()
            await self._producer.start()
        except KafkaError as e:
            raise TransientError(f"cannot reach Kafka at {self.settings.kafka_bootstrap_servers}: {e}") from e

    async def stop(self) -> None:
        await stop_consumer(self._consumer)
        await self._producer.stop()

    async def round(self, conn: asyncpg.Connection | None) -> Round:
        """Read, derive, compare with PostgreSQL (on ``conn``, if given), sign and publish (module docstring)."""
        done = Round()
        try:
            published = await self._read_checkpoints()
            pg = await stored_trees(conn, self.settings.events_topic) if conn is not None else {}
            at = await self._extend(pg)
        except KafkaError as e:
            raise TransientError(f"cannot read the log or the checkpoints at "
                                 f"{self.settings.kafka_bootstrap_servers}: {e}") from e
        if conn is not None:
            for partition, (kept, note) in published.items():  # published but maybe not kept: a signer stopped in
                await self._keep(conn, partition, kept, note)  # between, or another signer's
            for partition, derived in at.items():
                await self._compare(conn, partition, derived, done)
        to_sign: list[tuple[int, Checkpoint]] = []
        for partition, signed_log in sorted(self.logs.items()):
            try:
                checkpoint = signed_log.checkpoint()
            except Refused as e:
                log.error("not signing log partition %d: %s", partition, e)
                done.refused[partition] = str(e)
                continue
            if checkpoint is not None:
                to_sign.append((partition, checkpoint))
        await self._publish(to_sign, conn, done)
        return done

    async def _read_checkpoints(self) -> dict[int, tuple[Checkpoint, str]]:
        """Take in the checkpoints published since the last round (by this signer or another with its key); the
        last read of each partition, with its note."""
        cluster = await self._consumer._client.fetch_all_metadata()  # noqa: SLF001 - every topic, not the assigned
        topic_ = self.settings.checkpoints_topic
        tps = [TopicPartition(topic_, p) for p in sorted(cluster.partitions_for_topic(topic_) or ())]
        self._consumer.assign(tps)
        for tp in tps:  # all of them: an operator may have made the topic with more than one
            self._consumer.seek(tp, self._checkpoints_read.get(tp.partition, 0))
        base, topic = self.settings.checkpoint_origin, self.settings.events_topic
        taken: list[tuple[int, Checkpoint, Frontier | None, str]] = []

        def take(_: TopicPartition, messages: list[object]) -> None:
            for m in messages:
                try:
                    note = m.value.decode()  # type: ignore[attr-defined]
                    checkpoint = self._verifier.open(note)
                    if partition_of(checkpoint.origin, base)[0] != topic:
                        continue
                except (CheckpointError, UnicodeDecodeError, AttributeError):
                    continue  # another key's, another log's, or no note: not this signer's
                headers = dict(m.headers or ())  # type: ignore[attr-defined]
                frontier = None
                if FRONTIER_HEADER in headers:
                    try:
                        frontier = Frontier.decode(headers[FRONTIER_HEADER])
                    except CheckpointError as e:
                        log.warning("checkpoint %s at size %d: %s; the tree is derived again", checkpoint.origin,
                                    checkpoint.size, e)
                taken.append((partition_of(checkpoint.origin, base)[1], checkpoint, frontier, note))

        ends = await read_to_end(self._consumer, tps, take)
        self._checkpoints_read.update({tp.partition: end for tp, end in ends.items()})
        for partition, checkpoint, frontier, _ in taken:
            self._log(partition).signed_before(checkpoint, frontier)
        return {partition: (checkpoint, note) for partition, checkpoint, _, note in taken}

    def _log(self, partition: int) -> SignedLog:
        if partition not in self.logs:
            self.logs[partition] = SignedLog(origin_of(self.settings.checkpoint_origin, self.settings.events_topic,
                                                       partition))
        return self.logs[partition]

    async def _extend(self, pg: dict[int, StoredTree]) -> dict[int, _Derived]:
        """Read each partition from where its tree ends, noting what ``_compare`` needs of PostgreSQL's tree."""
        topic = self.settings.events_topic
        cluster = await self._consumer._client.fetch_all_metadata()  # noqa: SLF001 - every topic, not the assigned
        tps = [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
        derived = {tp.partition: _Derived(pg.get(tp.partition)) for tp in tps}
        for tp in tps:
            metrics.TREE_DISAGREEMENTS.labels(str(tp.partition))  # born at 0 before a finding can count
        if not tps:
            return derived
        self._consumer.assign(tps)
        for tp in tps:
            signed_log = self._log(tp.partition)
            derived[tp.partition].passed(signed_log)
            self._consumer.seek(tp, signed_log.read_from)

        def take(tp: TopicPartition, messages: list[object]) -> None:
            signed_log, seen = self.logs[tp.partition], derived[tp.partition]
            for m in messages:
                index = signed_log.tree.size
                leaf = signed_log.append(m.offset, m.value or b"")  # type: ignore[attr-defined]
                if leaf is not None:
                    seen.read(index, leaf, m.offset, signed_log)  # type: ignore[attr-defined]

        await read_to_end(self._consumer, tps, take)
        return derived

    async def _compare(self, conn: asyncpg.Connection, partition: int, derived: _Derived, done: Round) -> None:
        """PostgreSQL's tree of one partition against what was just derived from the log."""
        stored, size = derived.stored, self.logs[partition].tree.size
        if stored is None:
            return
        problem: tuple[int | None, int | None, str] | None = None
        if stored.size > size:
            problem = (size, None, f"PostgreSQL's tree holds {stored.size:,} leaves, the log {size:,}: leaves that "
                       "are no record of the log")
        elif derived.root_at_stored is not None and derived.root_at_stored != stored.root:
            problem = (None, None, f"PostgreSQL's root at size {stored.size:,} is {stored.root.hex()}, the log's "
                       f"{derived.root_at_stored.hex()}")
        if derived.leaves:
            first, last = min(derived.leaves), max(derived.leaves)
            kept = {r["index"]: bytes(r["hash"]) for r in await conn.fetch(query("tree_leaf_range"), stored.id,
                                                                             first, last + 1)}
            differs = next((i for i in sorted(derived.leaves) if kept.get(i) != derived.leaves[i][0]), None)
            if differs is not None:
                at = derived.leaves[differs][1]
                problem = (differs, at, f"PostgreSQL's leaf {differs:,} is not the log's record at offset {at}")
        if problem is None:
            return
        leaf, offset, what = problem
        log.error("log partition %d: %s; signing the log's tree, not PostgreSQL's", partition, what)
        metrics.TREE_DISAGREEMENTS.labels(str(partition)).inc()
        done.findings.append((partition, leaf, offset, what))
        await conn.execute(query("insert_tree_finding"), self.logs[partition].origin, leaf, offset, what)

    async def _publish(self, to_sign: Sequence[tuple[int, Checkpoint]], conn: asyncpg.Connection | None,
                       done: Round) -> None:
        """Sign, publish all together, then keep them in PostgreSQL (for `runledger prove`)."""
        if not to_sign:
            return
        signed = [Signed(p, c, self.signer.sign(c)) for p, c in to_sign]
        try:
            sent = [await self._producer.send(
                self.settings.checkpoints_topic, key=s.checkpoint.origin.encode(), value=s.note.encode(),
                headers=[(FRONTIER_HEADER, self.logs[s.partition].frontier().encode())]) for s in signed]
            for future in sent:
                await future
        except KafkaError as e:
            raise TransientError(f"cannot publish checkpoints to {self.settings.checkpoints_topic}: {e}") from e
        for s in signed:
            self.logs[s.partition].signed[s.checkpoint.size] = s.checkpoint.root
            done.signed.append(s)
        if conn is not None:
            for s in signed:
                await self._keep(conn, s.partition, s.checkpoint, s.note)

    async def _keep(self, conn: asyncpg.Connection, partition: int, checkpoint: Checkpoint, note: str) -> None:
        """Keep a published checkpoint in PostgreSQL, for `runledger prove`, unless it is kept already."""
        await conn.execute(query("keep_checkpoint"), checkpoint.origin, checkpoint.size, checkpoint.root,
                           self.signer.name, note, partition)
