"""The batch planner, by handing it records: every outcome, and that order and duplication change nothing."""

from __future__ import annotations

import itertools
import json
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from runledger.projections.planner import (
    AUDIT_COLUMNS,
    BatchPlanner,
    Loaded,
    Parked,
    Plan,
    Policy,
    ProjectedEvent,
    decoded,
)
from runledger.projections.pricing import load_tokencost_catalog
from runledger.projections.records import LogRecord
from runledger.schemas.chain import GENESIS_HASH, Head, compute_hash
from runledger.schemas.errors import InvalidEvent
from runledger.schemas.events import MAX_EVENT_BYTES, format_time

CATALOG = load_tokencost_catalog()
START = datetime(2026, 11, 22, 10, tzinfo=UTC)
NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


class Stream:
    """A valid chain for one stream, event by event, as the encoded values a producer writes."""

    def __init__(self, subject: str, writer: str = "") -> None:
        self.subject, self.seq, self.prev = subject, 0, GENESIS_HASH
        self.tag = zlib.crc32((subject + writer).encode()) % 10**6  # event ids: per stream and writer

    def __call__(self, type_: str, **data: Any) -> bytes:
        self.seq += 1
        raw = {"specversion": "1.0", "id": f"00000000-0000-4000-8000-{self.tag:06d}"
               f"{self.seq:06d}", "source": "/t", "type": type_, "subject": self.subject,
               "time": format_time(START + timedelta(seconds=self.seq)), "datacontenttype": "application/json",
               "seq": self.seq, "prevhash": self.prev, "data": data}
        raw["hash"] = self.prev = compute_hash(raw)
        return orjson.dumps(raw)


def run(subject: str, steps: int = 1) -> list[bytes]:
    """A whole execution: started, steps with a cost and an artifact each, completed."""
    e = Stream(subject)
    values = [e("execution.started", workflow="w", agent_id="a")]
    for n in range(steps):
        values += [e("step.started", step_id=f"s{n}", name="n", order=n),
                   e("cost.incurred", step_id=f"s{n}", provider="openai", model="gpt-4o", input_tokens=100 + n,
                     output_tokens=10, cost_usd="0.000125"),
                   e("artifact.created", step_id=f"s{n}", artifact_id=f"a{n}", type="report", name="r",
                     uri=f"s3://b/{subject}/{n}"),
                   e("step.completed", step_id=f"s{n}")]
    return [*values, e("execution.completed")]


def records(values: list[bytes], *, partition: int = 0, first: int = 0, attempts: int = 0) -> list[LogRecord]:
    return [LogRecord("events", partition, first + i, b"k", v, attempts=attempts) for i, v in enumerate(values)]


def planned(batch: list[LogRecord], loaded: Loaded | None = None, **policy: Any) -> Plan:
    planner = BatchPlanner(CATALOG, Policy(**policy), NOW)
    planner.add(decoded(batch))
    return planner.plan(loaded or Loaded())


def projected(value: bytes) -> tuple[str, ProjectedEvent]:
    """The ``Loaded.projected`` entry of an event of these bytes, as if it were projected."""
    event = orjson.loads(value)
    return event["id"], ProjectedEvent(event["subject"], event["seq"], event["hash"])


def codes(plan: Plan) -> list[str]:
    return [f.error.code for f in plan.result.dead]


# -- each outcome ------------------------------------------------------------------------------------------------

def test_a_whole_execution_is_projected_with_its_rows() -> None:
    plan = planned(records(run("x", steps=2)))
    assert plan.result.projected == [("x", s) for s in range(1, 11)]
    assert (len(plan.executions), len(plan.steps), len(plan.heads), len(plan.audit), len(plan.costs),
            len(plan.artifacts)) == (1, 2, 1, 10, 2, 2)
    execution = plan.executions[0]
    assert execution[0] == "x" and execution[4] == "completed" and execution[17] == Decimal("0.000250")
    assert plan.result.cost_usd == Decimal("0.000250")
    assert plan.heads == [("x", 10, orjson.loads(run("x", steps=2)[-1])["hash"])]
    assert dict(zip(AUDIT_COLUMNS, plan.audit[0], strict=True))["attempts"] == 1
    assert plan.offsets[0][:3] == ("events", 0, 10)


def test_each_key_gets_one_row_per_batch_the_last_events() -> None:
    e = Stream("x")
    values = [e("execution.started", workflow="w"),
              e("artifact.created", artifact_id="a", type="report", name="first", uri="s3://b/1"),
              e("artifact.created", artifact_id="a", type="report", name="second", uri="s3://b/2")]
    plan = planned(records(values))
    assert [(r[1], r[4], r[9]) for r in plan.artifacts] == [("a", "second", 3)]
    assert len(plan.executions) == len(plan.heads) == 1 and plan.heads[0][1] == 3


def test_an_event_already_projected_is_a_duplicate() -> None:
    values = run("x")
    plan = planned(records(values + values[:2], first=0))
    assert (len(plan.result.projected), plan.result.duplicates) == (len(values), 2)
    loaded = Loaded(projected=dict(map(projected, values)))
    again = planned(records(values), loaded)
    assert (again.result.projected, again.result.duplicates, again.audit) == ([], len(values), [])


def with_id(value: bytes, event_id: str) -> bytes:
    """The event of ``value`` under another ``id``, hashed again: a valid event, another one."""
    event = orjson.loads(value)
    event["id"] = event_id
    event["hash"] = compute_hash(event)
    return orjson.dumps(event)


def test_a_copy_is_a_duplicate_however_its_bytes_are_written() -> None:
    values = run("x")
    loaded = Loaded(heads={"x": Head(2, orjson.loads(values[1])["hash"])}, projected=dict(map(projected, values[:2])))
    respaced = [json.dumps(orjson.loads(v), indent=1, sort_keys=True).encode() for v in values[:2]]
    plan = planned(records(respaced), loaded)  # the same id, subject, seq and hash
    assert (plan.result.duplicates, plan.result.dead, plan.audit, plan.heads) == (2, [], [], [])


def test_a_projected_id_with_another_hash_is_an_id_conflict_naming_both_streams() -> None:
    a, b = run("a"), run("b")
    taken = orjson.loads(a[0])["id"]
    reused = with_id(b[0], taken)
    plan = planned(records([reused, *b[1:]]), Loaded(projected=dict([projected(a[0])])), retry_gaps=True)
    [letter] = plan.result.dead
    assert (letter.error.code, letter.stream_id, letter.seq, letter.event_id) == ("id_conflict", "b", 1, taken)
    assert str(letter.error) == (f"b seq 1: id {taken} is taken by a seq 1, projected with hash "
                                 f"{orjson.loads(a[0])['hash']}; this event hashes to {orjson.loads(reused)['hash']}")
    assert (plan.result.duplicates, plan.result.projected, plan.audit) == (0, [], [])
    assert (plan.result.parked, plan.result.retry) == (len(b) - 1, [])  # behind the letter, as behind any


def test_within_a_batch_the_second_event_with_an_id_is_an_id_conflict_in_any_order() -> None:
    a, b = run("a"), run("b")
    taken = orjson.loads(a[0])["id"]
    batch = records([*a, with_id(b[0], taken), *b[1:]])
    for order in (batch, batch[::-1]):
        plan = planned(order)
        assert [(f.error.code, f.stream_id, f.seq) for f in plan.result.dead] == [("id_conflict", "b", 1)]
        assert "taken by a seq 1" in str(plan.result.dead[0].error)
        assert plan.result.projected == [("a", s) for s in range(1, len(a) + 1)] and plan.result.duplicates == 0
    e = Stream("x")
    first = e("execution.started", workflow="w")
    second = with_id(e("step.started", step_id="s", name="n"), orjson.loads(first)["id"])  # one stream
    plan = planned(records([first, second]))
    assert [(f.error.code, f.seq) for f in plan.result.dead] == [("id_conflict", 2)]
    assert "taken by x seq 1" in str(plan.result.dead[0].error) and plan.result.projected == [("x", 1)]


def test_a_parked_event_whose_id_was_taken_meanwhile_leaves_the_parked_table_as_an_id_conflict() -> None:
    a, x = run("a"), run("x")
    reused = with_id(x[1], orjson.loads(a[0])["id"])
    parked = [Parked("x", 2, orjson.loads(reused)["id"], records([reused], first=1)[0])]
    plan = planned(records(x[:1]), Loaded(projected=dict([projected(a[0])]), parked=parked))
    assert plan.unparks == [("x", 2, orjson.loads(a[0])["id"])] and codes(plan) == ["id_conflict"]
    assert plan.result.projected == [("x", 1)]


def test_a_gap_parks_without_retry_topics_and_retries_with_them() -> None:
    values = run("x")
    parked = planned(records(values[2:], first=2))
    assert (parked.result.parked, len(parked.parks), parked.result.retry) == (len(values) - 2, len(values) - 2, [])
    retried = planned(records(values[2:], first=2), retry_gaps=True)
    assert {f.error.code for f in retried.result.retry} == {"predecessor_missing"}
    assert len(retried.result.retry) == len(values) - 2 and retried.parks == []


def test_retries_end_in_a_dead_letter() -> None:
    values = run("x")
    exhausted = planned(records(values[1:2], first=1, attempts=5), retry_gaps=True, max_attempts=6)
    assert codes(exhausted) == ["retries_exhausted"] and "6 attempts" in str(exhausted.result.dead[0].error)
    # Its followers out of retries in the same batch park behind its letter, as they would in a later batch.
    together = planned(records(values[1:4], first=1, attempts=5), retry_gaps=True, max_attempts=6)
    assert codes(together) == ["retries_exhausted"] and together.result.parked == 2
    huge_key = LogRecord("events", 0, 1, b"k" * (MAX_EVENT_BYTES + 65 * 1024), values[1])
    too_big = planned([huge_key], retry_gaps=True)
    assert codes(too_big) == ["retries_exhausted"] and "cannot travel" in str(too_big.result.dead[0].error)


def test_invalid_records_are_dead_lettered_with_what_is_known_of_them() -> None:
    values = run("x")
    forged = orjson.loads(values[0])
    forged["data"]["workflow"] = "forged"
    plan = planned([LogRecord("events", 0, 0, None, b"{not json"), LogRecord("events", 0, 1, None,
                                                                               orjson.dumps(forged))])
    assert codes(plan) == ["invalid_json", "hash_mismatch"]
    bad_hash, not_json = plan.result.dead[1], plan.result.dead[0]
    assert (bad_hash.stream_id, bad_hash.claimed_stream_id, bad_hash.seq) == (None, "x", 1)  # claimed: proves nothing
    assert (not_json.stream_id, not_json.claimed_stream_id) == (None, None)


def test_a_record_whose_hash_does_not_verify_blocks_no_stream_it_names() -> None:
    """A record can claim any subject: unless its hash verifies, its letter is kept apart from that stream, whose
    later events go on through the retry topics as if it were not there."""
    victim = run("victim")
    claims = [orjson.loads(victim[2]) for _ in range(4)]
    claims[0]["data"]["input_tokens"] = 1  # a wrong hash, or none that could be right
    claims[1]["hash"] = "f" * 64
    claims[2]["data"]["provider"] = "p" * 500  # invalid, and the hash does not verify either
    claims[3]["seq"] = 2**53  # JCS has no form for it: no hash at all
    too_large = {**claims[0], "data": {"blob": "x" * MAX_EVENT_BYTES}}
    values = [*map(orjson.dumps, claims), orjson.dumps(too_large), victim[4]]  # then seq 5: seq 2..4 not here yet
    plan = planned(records(values), Loaded(heads={"victim": Head(1, orjson.loads(victim[0])["hash"])}),
                   retry_gaps=True)
    assert codes(plan) == ["hash_mismatch", "hash_mismatch", "invalid_event", "invalid_event", "too_large"]
    assert [(f.stream_id, f.claimed_stream_id) for f in plan.result.dead] == [(None, "victim")] * 4 + [
        (None, None)]  # too large: not read at all
    assert [(f.error.code, f.stream_id, f.seq) for f in plan.result.retry] == [
        ("predecessor_missing", "victim", 5)]  # not parked: the victim is not blocked
    assert plan.result.parked == 0


def test_a_record_whose_hash_verifies_belongs_to_its_stream_though_its_data_is_invalid() -> None:
    """Its producer hashed and chained on it: the events after it wait behind its letter."""
    e = Stream("x")
    values = [e("execution.started", workflow="w"), e("step.started", step_id="s" * 201, name="n"),
              e("step.completed", step_id="s")]
    unknown = Stream("y")
    other = [unknown("execution.started", workflow="w"), unknown("agent.exploded"), unknown("execution.completed")]
    plan = planned(records([*values, *other]), retry_gaps=True)
    assert [(f.error.code, f.stream_id, f.claimed_stream_id, f.seq) for f in plan.result.dead] == [
        ("invalid_event", "x", None, 2), ("unknown_type", "y", None, 2)]
    assert (plan.result.projected, plan.result.parked, plan.result.retry) == ([("x", 1), ("y", 1)], 2, [])


def test_an_event_with_two_members_of_one_name_is_an_invalid_event_that_names_its_stream() -> None:
    values = run("x")
    twice = b'{"data":{"workflow":"another"},' + values[0][1:]  # the hash is right for the last "data"
    plan = planned(records([twice, *values[1:]]), retry_gaps=True)
    [letter] = plan.result.dead
    assert (letter.error.code, str(letter.error)) == ("invalid_event", 'data: duplicate member "data"')
    assert (letter.stream_id, letter.seq, letter.event_id) == ("x", 1, orjson.loads(values[0])["id"])
    assert (plan.result.projected, plan.result.retry, plan.result.parked) == ([], [], len(values) - 1)


def test_a_dead_letter_blocks_its_stream_so_later_events_park_even_with_retry_topics() -> None:
    e = Stream("x")
    values = [e("execution.started", workflow="w"), e("step.completed", step_id="never"),
              e("execution.completed")]
    plan = planned(records(values), retry_gaps=True)
    assert codes(plan) == ["illegal_transition"]
    assert (plan.result.projected, plan.result.parked, plan.result.retry) == ([("x", 1)], 1, [])
    blocked = planned(records(values[2:], first=2), Loaded(blocked={"x"}), retry_gaps=True)
    assert (blocked.result.parked, blocked.result.retry) == (1, [])


def test_forks_and_broken_links_are_dead_lettered_and_the_first_in_the_log_wins() -> None:
    e, fork = Stream("x"), Stream("x", writer="another")
    first = e("execution.started", workflow="w")
    fork("execution.started", workflow="w")
    second, other = e("execution.completed"), fork("execution.failed", error={"type": "t", "message": "m"})
    plan = planned([LogRecord("events", 0, 5, None, other), LogRecord("events", 0, 4, None, second),
                    LogRecord("events", 0, 3, None, first)])
    assert plan.result.projected == [("x", 1), ("x", 2)] and codes(plan) == ["seq_conflict"]
    assert plan.result.dead[0].record.offset == 5
    broken = planned(records([other], first=9), Loaded(heads={"x": Head(1, "f" * 64)}))
    assert codes(broken) == ["chain_broken"]


def test_parked_events_follow_their_predecessor_and_leave_the_parked_table() -> None:
    values = run("x")
    parked = [Parked("x", n + 1, orjson.loads(v)["id"], r) for n, (v, r) in
              enumerate(zip(values, records(values), strict=True)) if n >= 1]
    plan = planned(records(values[:1]), Loaded(parked=parked))
    assert plan.result.projected == [("x", s) for s in range(1, len(values) + 1)]
    assert len(plan.unparks) == len(values) - 1 and plan.result.parked == 0
    assert plan.offsets == [("events", 0, 1, plan.offsets[0][3])]  # only records read now move offsets
    not_followed = planned(records(values[:1]), Loaded(parked=parked), follow_parked=False)
    assert not_followed.unparks == [] and len(not_followed.result.projected) == 1


def test_a_parked_event_that_is_now_a_duplicate_leaves_the_parked_table() -> None:
    values = run("x")
    event = orjson.loads(values[1])
    loaded = Loaded(heads={"x": Head(1, orjson.loads(values[0])["hash"])}, projected=dict([projected(values[1])]),
                    parked=[Parked("x", 2, event["id"], records(values)[1])])
    plan = planned(records(values[2:3], first=2), loaded)
    assert plan.unparks == [("x", 2, event["id"])] and plan.result.duplicates == 0


def test_a_record_the_database_refused_is_dead_lettered_whatever_it_is() -> None:
    values = run("x")
    plan = planned(records(values[:1]), refused=InvalidEvent([("data", "refused")]))
    assert codes(plan) == ["invalid_event"] and plan.result.projected == []
    assert plan.unparks == [("x", 1, orjson.loads(values[0])["id"])]


def test_offsets_move_to_the_last_record_read_from_the_log_per_partition() -> None:
    values = run("x")
    batch = records(values[:3], partition=1, first=40) + records(values[3:], partition=2, first=7)
    batch += [LogRecord("events", 2, 900, None, values[0], attempts=2)]  # from a retry topic: moves nothing
    plan = planned(batch)
    assert sorted(o[:3] for o in plan.offsets) == [("events", 1, 43), ("events", 2, 7 + len(values) - 3)]


# -- any order, any duplication, any split into batches: the same tables -----------------------------------------

@dataclass
class Tables:
    """The projection tables as the store keeps them, folded from plans (upserts by key, as in sql/)."""

    loaded: Loaded = field(default_factory=Loaded)
    rows: dict[str, dict[Any, Any]] = field(default_factory=lambda: {
        t: {} for t in ("executions", "steps", "heads", "audit", "artifacts", "parked", "letters")})
    costs: list[Any] = field(default_factory=list)

    def apply(self, batch: list[LogRecord], policy: Policy) -> None:
        planner = BatchPlanner(CATALOG, policy, NOW)
        planner.add(decoded(batch))
        mine = set(planner.streams)
        parked = [Parked(k[0], k[1], k[2], LogRecord(r[4], r[5], r[6], None, r[3]))
                  for k, r in self.rows["parked"].items() if k[0] in mine]
        plan = planner.plan(Loaded(self.loaded.heads, self.loaded.states, self.loaded.projected,
                                   self.loaded.blocked, parked))
        rows = self.rows
        rows["executions"].update({r[0]: r for r in plan.executions})
        rows["steps"].update({r[:2]: r for r in plan.steps})
        rows["heads"].update({r[0]: r for r in plan.heads})
        for r in plan.audit:
            rows["audit"].setdefault(r[0], r)
        rows["artifacts"].update({r[:2]: r for r in plan.artifacts})
        for r in plan.parks:
            rows["parked"].setdefault(r[:3], r)
        for key in plan.unparks:
            rows["parked"].pop(key, None)
        for f in plan.result.dead:
            rows["letters"].setdefault((f.record.topic, f.record.partition, f.record.offset), f.error.code)
            if f.stream_id is not None:
                self.loaded.blocked.add(f.stream_id)
        self.costs += plan.costs

    def snapshot(self) -> dict[str, Any]:
        return {**{t: sorted(map(repr, v.items())) for t, v in self.rows.items()}, "costs": sorted(map(repr,
                                                                                                     self.costs))}


def fleet() -> list[LogRecord]:
    """Three executions interleaved on two partitions, one with an illegal event and one forged record."""
    values = run("a", steps=2) + run("b", steps=1)
    e = Stream("c")
    values += [e("execution.started", workflow="w"), e("step.completed", step_id="never"),
               e("execution.completed")]
    forged = orjson.loads(values[1])
    forged["data"]["name"] = "forged"
    values.append(orjson.dumps(forged))
    return [LogRecord("events", i % 2, i // 2, None, v) for i, v in enumerate(values)]


FLEET = fleet()
REFERENCE: dict[bool, dict[str, Any]] = {}


def reference(retry_gaps: bool) -> dict[str, Any]:
    if retry_gaps not in REFERENCE:
        tables = Tables()
        tables.apply(FLEET, Policy(retry_gaps=retry_gaps))
        REFERENCE[retry_gaps] = tables.snapshot()
    return REFERENCE[retry_gaps]


def test_the_reference_fleet_ends_as_expected() -> None:
    tables = Tables()
    tables.apply(FLEET, Policy())
    assert set(tables.rows["executions"]) == {"a", "b", "c"}
    assert sorted(tables.rows["letters"].values()) == ["hash_mismatch", "illegal_transition"]
    assert [k[:2] for k in tables.rows["parked"]] == [("c", 3)]


@settings(max_examples=150, deadline=None)
@given(order=st.permutations(range(len(FLEET))), copies=st.lists(st.integers(0, len(FLEET) - 1), max_size=12),
       retry_gaps=st.booleans())
def test_any_order_and_duplication_in_one_batch_gives_the_same_tables(order: list[int], copies: list[int],
                                                                       retry_gaps: bool) -> None:
    tables = Tables()
    tables.apply([FLEET[i] for i in order] + [FLEET[i] for i in copies], Policy(retry_gaps=retry_gaps))
    assert tables.snapshot() == reference(retry_gaps)


@settings(max_examples=150, deadline=None)
@given(order=st.permutations(range(len(FLEET))), copies=st.lists(st.integers(0, len(FLEET) - 1), max_size=12),
       cuts=st.lists(st.integers(1, len(FLEET) + 11), max_size=6))
def test_any_order_duplication_and_split_into_batches_gives_the_same_tables(order: list[int], copies: list[int],
                                                                            cuts: list[int]) -> None:
    delivered = [FLEET[i] for i in order] + [FLEET[i] for i in copies]
    bounds = [0, *sorted(c for c in cuts if c < len(delivered)), len(delivered)]
    tables = Tables()
    for start, end in itertools.pairwise(bounds):
        tables.apply(delivered[start:end], Policy())
    assert tables.snapshot() == reference(False)


def test_a_record_runledgers_own_checks_fail_on_is_dead_lettered_alone(monkeypatch: Any) -> None:
    from runledger.projections import planner as planner_module

    values = run("x")
    real = planner_module.parse_event

    def buggy(raw: Any) -> Any:
        if raw["seq"] == 2:
            raise RuntimeError("a bug")
        return real(raw)

    monkeypatch.setattr(planner_module, "parse_event", buggy)
    plan = planned(records(values))
    assert codes(plan) == ["processing_failed"] and "RuntimeError: a bug" in str(plan.result.dead[0].error)
    assert plan.result.dead[0].record.offset == 1 and plan.result.projected == [("x", 1)]
    assert plan.result.parked == len(values) - 2  # behind the letter, as behind any dead letter
