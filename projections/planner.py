"""The batch planner: what becomes of each record of a batch, and the rows to write. Pure: no I/O.

Every record ends in one outcome (SPEC.md section 6): projected, duplicate (its
``id`` and ``hash`` are a projected event's), parked behind a dead-lettered
predecessor (or, without retry topics, behind a gap), dead-lettered (among
others, ``id_conflict``: its ``id`` is a projected event's, its ``hash`` is
not), or handed back for retry (its predecessor is not projected yet). The
PostgreSQL side decodes nothing and decides nothing: it locks the batch's
streams, loads what the planner asks for (``Loaded``), and writes the ``Plan``
it gets back in one transaction.

Within a stream, events apply in ``seq`` order and, for equal ``seq``, in log
order, so a batch gives the same tables whatever order its records come in.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

from runledger.projections.pricing import PriceCatalog
from runledger.projections.records import BatchResult, Failure, LogRecord, ProcessingFailed, pg_text
from runledger.projections.rules import ArtifactRow, CostRow, ExecutionState, Projected, StepState, apply
from runledger.schemas.chain import Head, link_error
from runledger.schemas.errors import (
    ChainBroken,
    DuplicateMember,
    IdConflict,
    PermanentError,
    PredecessorMissing,
    RetriesExhausted,
    RunledgerError,
    SeqConflict,
)
from runledger.schemas.events import MAX_EVENT_BYTES, MAX_ID_CHARS, Event, decode_event, parse_event, proven_stream

__all__ = ["ARTIFACT_COLUMNS", "AUDIT_COLUMNS", "COST_COLUMNS", "EXECUTION_COLUMNS", "STEP_COLUMNS", "BatchPlanner",
           "Decoded", "Loaded", "Parked", "Plan", "Policy", "ProjectedEvent", "artifact_row", "as_record", "cost_row",
           "decode", "decoded", "execution_row", "step_row"]

log = logging.getLogger(__name__)

# A record larger than this cannot travel through a retry topic (its copy adds headers): it is dead-lettered.
_RETRY_BYTES = MAX_EVENT_BYTES + 64 * 1024

AUDIT_COLUMNS = ("event_id", "stream_id", "seq", "type", "source", "specversion", "datacontenttype", "dataschema",
                 "traceparent", "time", "hash", "raw", "prevhash", "kafka_topic", "kafka_partition", "kafka_offset",
                 "attempts")
COST_COLUMNS = ("event_id", "stream_id", "seq", "step_id", "provider", "model", "input_tokens", "output_tokens",
                "cached_tokens", "cost_usd", "cost_source", "catalog_version", "occurred_at")
_COST_USD = COST_COLUMNS.index("cost_usd")
# The rows' columns, in the order of the tuples below (and of the upserts in sql/queries.sql).
EXECUTION_COLUMNS = ("stream_id", "workflow", "agent_id", "customer_id", "status", "started_at", "ended_at",
                     "duration_ms", "steps_total", "steps_running", "steps_retrying", "steps_completed",
                     "steps_failed", "steps_skipped", "input_tokens", "output_tokens", "cached_tokens", "cost_usd",
                     "unpriced_costs", "budget_usd", "error", "last_seq", "last_hash")
STEP_COLUMNS = ("stream_id", "step_id", "name", "step_order", "status", "attempts", "started_at", "ended_at", "error",
                "cost_usd")
ARTIFACT_COLUMNS = ("stream_id", "artifact_id", "step_id", "type", "name", "uri", "size_bytes", "content_type",
                    "created_at", "seq")


@dataclass(frozen=True, slots=True)
class Policy:
    """How a batch treats what it cannot project now.

    ``retry_gaps``: an event whose predecessor is missing goes to the retry topics (the worker); else it parks
    (rebuilds, replays). ``follow_parked``: events parked earlier on the batch's streams join it.
    ``refused``: PostgreSQL refused this batch of one record, whatever it is; it is dead-lettered with this error.
    """

    max_attempts: int = 6
    retry_gaps: bool = False
    follow_parked: bool = True
    refused: PermanentError | None = None


@dataclass(frozen=True, slots=True)
class Decoded:
    """A record and what its bytes are: the event and the JSON object it was decoded from, or the error that
    refuses it (with as much of the JSON as was read, to name the stream in its dead letter)."""

    record: LogRecord
    event: Event | None
    raw: Any
    error: PermanentError | None = None


def decode(record: LogRecord) -> Decoded:
    """Decode and check one record (size, JSON, schema, hash). Needs nothing of the tables, so a worker does
    it for the next batch while the current one commits."""
    raw = None
    try:
        raw = decode_event(record.value)
        return Decoded(record, parse_event(raw), raw)
    except DuplicateMember as e:  # its letter names its stream, as for any event read as JSON
        return Decoded(record, None, e.decoded, e)
    except PermanentError as e:
        return Decoded(record, None, raw, e)
    except Exception as e:  # noqa: BLE001 - a bug in runledger's checks: this record alone is dead-lettered
        log.exception("%s[%d]@%d: decoding failed in runledger's own code", record.topic, record.partition,
                      record.offset)
        return Decoded(record, None, raw, ProcessingFailed(pg_text(f"{type(e).__name__}: {e}")))


def as_record(item: LogRecord | Decoded) -> LogRecord:
    return item.record if isinstance(item, Decoded) else item


def decoded(items: Iterable[LogRecord | Decoded]) -> list[Decoded]:
    """``items`` decoded, those decoded already as they are."""
    return [item if isinstance(item, Decoded) else decode(item) for item in items]


@dataclass(frozen=True, slots=True)
class Parked:
    """An event parked by an earlier batch, as stored."""

    stream_id: str
    seq: int
    event_id: str
    record: LogRecord


class ProjectedEvent(NamedTuple):
    """A projected event, as ``audit_log`` holds it under its ``id``: its stream, ``seq`` and ``hash``."""

    stream_id: str
    seq: int
    hash: str


@dataclass(slots=True)
class Loaded:
    """What the tables hold for the batch's streams, read under their locks: ``projected`` has every projected
    event whose ``id`` is one of the batch's (parked events' included). The planner updates ``states`` and
    ``projected`` in place."""

    heads: dict[str, Head] = field(default_factory=dict)
    states: dict[str, ExecutionState] = field(default_factory=dict)
    projected: dict[str, ProjectedEvent] = field(default_factory=dict)
    blocked: set[str] = field(default_factory=set)  # streams with an open dead letter
    parked: list[Parked] = field(default_factory=list)


Row = tuple[Any, ...]


@dataclass(slots=True)
class Plan:
    """The rows one transaction writes, table by table, and what became of each record (``result``)."""

    result: BatchResult = field(default_factory=BatchResult)
    executions: list[Row] = field(default_factory=list)
    steps: list[Row] = field(default_factory=list)
    heads: list[Row] = field(default_factory=list)
    audit: list[Row] = field(default_factory=list)
    costs: list[Row] = field(default_factory=list)
    artifacts: list[Row] = field(default_factory=list)
    parks: list[Row] = field(default_factory=list)
    unparks: list[Row] = field(default_factory=list)
    offsets: list[tuple[str, int, int, str]] = field(default_factory=list)  # topic, partition, next, SHA-256
    fresh: list[LogRecord] = field(default_factory=list)  # read from the log now: its trees' next leaves

    def counts(self) -> dict[str, int]:
        """Rows written per table, leaving out dead letters and the outbox (the store counts those)."""
        return {"executions": len(self.executions), "stream_heads": len(self.heads), "steps": len(self.steps),
                "audit_log": len(self.audit), "costs": len(self.costs), "artifacts": len(self.artifacts),
                "parked_events": len(self.parks) - len(self.unparks)}


# An event of the batch: the event, its record, and whether it was parked by an earlier batch.
_Item = tuple[Event, LogRecord, bool]


class BatchPlanner:
    """Plans one batch: ``add`` its records, load what ``streams`` and ``event_ids`` name, then ``plan``."""

    def __init__(self, catalog: PriceCatalog, policy: Policy, now: datetime) -> None:
        self.catalog, self.policy, self.now = catalog, policy, now
        self.plan_ = Plan()
        self._by_stream: dict[str, list[_Item]] = defaultdict(list)
        self._blocked: set[str] = set()
        self._records: list[LogRecord] = []
        self._artifacts: dict[tuple[str, str], Row] = {}

    @property
    def streams(self) -> list[str]:
        """The streams to lock and load, sorted."""
        return sorted(self._by_stream)

    @property
    def event_ids(self) -> list[str]:
        return [event.id for items in self._by_stream.values() for event, _, _ in items]

    def add(self, items: Iterable[Decoded]) -> None:
        """Take the batch's decoded records; what is not a valid event leaves the batch here."""
        refused = self.policy.refused
        for item in items:
            record, event, raw = item.record, item.event, item.raw
            self._records.append(record)
            if refused is not None:  # this record alone, refused by PostgreSQL whatever it is: it leaves
                self._fail(record, refused, event, raw=raw)
                if event is not None:  # if it was parked, its letter holds it now
                    self.plan_.unparks.append((event.subject, event.seq, event.id))
            elif item.error is not None:
                self._fail(record, item.error, raw=raw)
            else:
                assert event is not None  # a Decoded has its event or its error
                self._by_stream[event.subject].append((event, record, False))

    def plan(self, loaded: Loaded) -> Plan:
        """Every record's outcome and the rows to write, given what the tables hold (``loaded``)."""
        self._blocked |= loaded.blocked
        if self.policy.follow_parked:
            self._follow(loaded.parked)
        touched: dict[str, set[str]] = {}
        for stream in sorted(self._by_stream):
            steps = self._project_stream(stream, loaded)
            if steps is not None:
                touched[stream] = steps
        plan, states, heads = self.plan_, loaded.states, loaded.heads
        plan.executions = [execution_row(states[s]) for s in touched]
        plan.steps = [step_row(s, states[s].steps[step]) for s, steps in touched.items() for step in sorted(steps)]
        plan.heads = [(s, heads[s].seq, heads[s].hash) for s in touched]
        plan.artifacts = list(self._artifacts.values())
        plan.offsets = _offsets(self._records)
        plan.fresh = [r for r in self._records if r.attempts == 0 and r.dead_letter_id is None]
        plan.result.cost_usd = sum((c[_COST_USD] for c in plan.costs if c[_COST_USD] is not None), Decimal(0))
        return plan

    def _follow(self, parked: Sequence[Parked]) -> None:
        for p in parked:
            if p.stream_id not in self._by_stream:
                continue
            item = decode(p.record)
            if item.error is not None:  # parked under older, looser rules: it leaves the stream now
                self._fail(p.record, item.error, raw=item.raw)
                self.plan_.unparks.append((p.stream_id, p.seq, p.event_id))
                continue
            assert item.event is not None  # a Decoded has its event or its error
            self._by_stream[p.stream_id].append((item.event, p.record, True))

    def _project_stream(self, stream: str, loaded: Loaded) -> set[str] | None:
        """Apply the stream's events in order; the steps touched, or None if the stream did not advance."""
        plan, result = self.plan_, self.plan_.result
        start = head = loaded.heads.get(stream, Head())
        state = loaded.states.get(stream)
        touched: set[str] = set()
        pending = sorted(self._by_stream[stream], key=_order)
        advanced = True
        while pending and advanced:  # parked events may become applicable as the head moves
            advanced, waiting = False, []
            for item in pending:
                event, record, was_parked = item
                known = loaded.projected.get(event.id)
                # Same id, same hash: a copy (the hash covers subject and seq too, so this is also the event
                # projected at its subject and seq). Same id, another hash: another event, never a duplicate.
                if known is not None and known.hash == event.hash:
                    if was_parked:
                        plan.unparks.append((event.subject, event.seq, event.id))
                    else:
                        result.duplicates += 1
                    continue
                if known is not None:
                    if was_parked:
                        plan.unparks.append((event.subject, event.seq, event.id))
                    self._fail(record, IdConflict(
                        f"{stream} seq {event.seq}: id {event.id} is taken by {known.stream_id} seq {known.seq}, "
                        f"projected with hash {known.hash}; this event hashes to {event.hash}"), event)
                    continue
                problem = link_error(head, {"seq": event.seq, "prevhash": event.prevhash})
                if problem is not None and problem[0] == "seq_gap":
                    waiting.append(item)
                    continue
                if was_parked:
                    plan.unparks.append((event.subject, event.seq, event.id))
                if problem is not None:
                    error = SeqConflict if problem[0] == "seq_conflict" else ChainBroken
                    self._fail(record, error(f"{stream} seq {event.seq}: {problem[1]}"), event)
                    continue
                try:
                    done = apply(state, event, self.catalog)
                except PermanentError as e:
                    self._fail(record, e, event)
                    continue
                state, head, advanced = done.state, Head(event.seq, event.hash), True
                loaded.projected[event.id] = ProjectedEvent(event.subject, event.seq, event.hash)
                self._record(done, event, record)
                touched.update(done.touched_steps)
            pending = waiting
        for event, record, was_parked in pending:
            if was_parked:
                continue  # parked earlier, still waiting
            # Behind a dead letter of its stream it waits for the replay; otherwise its predecessor is
            # still on its way (in a retry topic, say), so it follows through the retry topics.
            if self.policy.retry_gaps and stream not in self._blocked:
                self._fail(record, PredecessorMissing(
                    f"{stream} seq {event.seq}: seq {head.seq + 1} is not projected yet"), event)
                continue
            result.parked += 1
            plan.parks.append((event.subject, event.seq, event.id, record.value, record.topic, record.partition,
                               record.offset))
        if state is None or head == start:
            return None
        loaded.states[stream], loaded.heads[stream] = state, head
        return touched

    def _record(self, done: Projected, event: Event, record: LogRecord) -> None:
        plan = self.plan_
        plan.result.projected.append((event.subject, event.seq))
        plan.result.times.append(event.time)
        plan.audit.append((event.id, event.subject, event.seq, event.type, event.source, event.specversion,
                           event.datacontenttype, event.dataschema, event.traceparent, event.time,
                           event.hash, record.value, event.prevhash, record.topic, record.partition, record.offset,
                           record.attempts + 1))
        plan.costs += [cost_row(c) for c in done.costs]
        for a in done.artifacts:  # one row per key and batch, the last event's, as the upsert needs
            self._artifacts[a.stream_id, a.artifact_id] = artifact_row(a)

    def _fail(self, record: LogRecord, error: RunledgerError, event: Event | None = None, raw: Any = None) -> None:
        """Send ``record`` out of the batch: to retry if ``error`` is transient and attempts remain, else dead.

        A dead letter blocks the stream it belongs to (its later events park behind it): ``event``'s, or for a record
        that is no valid event, the stream it proves by its hash (``proven_stream``). One that proves nothing only
        claims its subject (``Failure.claimed_stream_id``): it blocks no stream."""
        if event is not None:
            failure = Failure(record, error, self.now, event.subject, event.seq, event.id, event.type)
        else:
            failure = _failure_of(record, error, self.now, raw)
        size = len(record.value) + len(record.key or b"")
        if error.transient and failure.attempts >= self.policy.max_attempts:
            failure = replace(failure, error=RetriesExhausted(
                f"{failure.attempts} attempts from {failure.first_failed:%Y-%m-%dT%H:%M:%SZ}; last: "
                f"{error.code}: {error}"))
        elif error.transient and size > _RETRY_BYTES:
            failure = replace(failure, error=RetriesExhausted(
                f"a record of {size:,} bytes cannot travel through a retry topic; {error.code}: {error}"))
        result = self.plan_.result
        if failure.error.transient:
            result.retry.append(failure)
            return
        result.dead.append(failure)
        if failure.stream_id is not None:  # out of retries too: what follows it in this batch parks behind it
            self._blocked.add(failure.stream_id)


def _order(item: _Item) -> tuple[int, str, int, int]:
    record = item[1]
    return item[0].seq, record.topic, record.partition, record.offset


def _offsets(records: Iterable[LogRecord]) -> list[tuple[str, int, int, str]]:
    """Per partition read from the log now: the next offset and the SHA-256 of the record before it. A retried
    or replayed record is behind these offsets and moves none."""
    last: dict[tuple[str, int], LogRecord] = {}
    for r in records:
        if r.attempts == 0:
            key = (r.topic, r.partition)
            if key not in last or r.offset > last[key].offset:
                last[key] = r
    return [(t, p, r.offset + 1, hashlib.sha256(r.value).hexdigest()) for (t, p), r in last.items()]


def _failure_of(record: LogRecord, error: RunledgerError, now: datetime, raw: Any) -> Failure:
    """The failure of a record that is not a valid event, with its seq, id and type as far as its JSON has them, and
    its subject as its stream if its hash proves it, else only as the stream it claims."""
    if not isinstance(raw, dict):
        return Failure(record, error, now)

    def text(name: str) -> str | None:
        value = raw.get(name)
        return pg_text(value, MAX_ID_CHARS) if isinstance(value, str) else None

    seq = raw.get("seq")
    seq = seq if type(seq) is int and 0 < seq < 2**63 else None
    stream = proven_stream(raw)
    return Failure(record, error, now, stream, seq, text("id"), text("type"),
                   claimed_stream_id=None if stream is not None else text("subject"))


def execution_row(s: ExecutionState) -> Row:
    counts = s.step_counts()
    return (s.stream_id, s.workflow, s.agent_id, s.customer_id, s.status, s.started_at, s.ended_at, s.duration_ms,
            len(s.steps), counts["running"], counts["retrying"], counts["completed"], counts["failed"],
            counts["skipped"], s.input_tokens, s.output_tokens, s.cached_tokens, s.cost_usd, s.unpriced_costs,
            s.budget_usd, s.error, s.last_seq, s.last_hash)


def step_row(stream: str, s: StepState) -> Row:
    return (stream, s.step_id, s.name, s.order, s.status, s.attempts, s.started_at, s.ended_at, s.error,
            s.cost_usd or Decimal(0))


def cost_row(c: CostRow) -> Row:
    return (c.event_id, c.stream_id, c.seq, c.step_id, c.provider, c.model, c.input_tokens, c.output_tokens,
            c.cached_tokens, c.cost_usd, c.cost_source, c.catalog_version, c.occurred_at)


def artifact_row(a: ArtifactRow) -> Row:
    return (a.stream_id, a.artifact_id, a.step_id, a.type, a.name, a.uri, a.size_bytes, a.content_type, a.created_at,
            a.seq)
