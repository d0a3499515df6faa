"""Checking the projection tables against the rules: the rows the rules produce from each stream's stored
events, compared column by column with the rows the tables hold. Pure: no I/O.

The expected rows come from the same rules and row layouts a worker writes with (``runledger.projections.rules``
and the planner's rows), applied to the events of ``audit_log`` in ``seq`` order. A cost priced from the catalog
is priced again with the catalog version its stored row names (the version the worker priced it with), so a
newer catalog is not a difference; a cost whose stored row names no stored version is priced with the newest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from runledger.projections.planner import (
    ARTIFACT_COLUMNS,
    COST_COLUMNS,
    EXECUTION_COLUMNS,
    STEP_COLUMNS,
    artifact_row,
    cost_row,
    execution_row,
    step_row,
)
from runledger.projections.pricing import PriceCatalog
from runledger.projections.rules import ExecutionState, apply
from runledger.schemas.errors import InvalidEvent, PermanentError
from runledger.schemas.events import decode_event, parse_event
from runledger.schemas.verify import Finding

__all__ = ["TABLES", "EventRefused", "ProjectionAuditor", "RowFinding", "StreamRows", "empty_rows", "expected_rows"]

Row = tuple[Any, ...]
StreamRows = dict[str, dict[str, Row]]
"""One stream's rows: table -> the row's key (its primary key without the stream) -> the row."""

TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "executions": (EXECUTION_COLUMNS, "stream_id"),
    "steps": (STEP_COLUMNS, "step_id"),
    "costs": (COST_COLUMNS, "event_id"),
    "artifacts": (ARTIFACT_COLUMNS, "artifact_id"),
}
"""The projection tables checked: table -> (the columns compared, in row order; the key column)."""

_COST_VERSION = COST_COLUMNS.index("catalog_version")


@dataclass(frozen=True, slots=True)
class RowFinding(Finding):
    """A projection row that is not what the rules produce from the stream's events."""

    table: str = ""
    key: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**Finding.as_dict(self), "table": self.table, "key": self.key}


def empty_rows() -> StreamRows:
    return {table: {} for table in TABLES}


class EventRefused(Exception):
    """The rules refuse a stored event (``error``), so its stream's rows cannot be derived."""

    def __init__(self, seq: int, event_id: str, error: PermanentError) -> None:
        super().__init__(f"seq {seq} (event {event_id}): {error.code}: {error}")
        self.seq, self.event_id, self.error = seq, event_id, error


def expected_rows(stream_id: str, events: Iterable[tuple[int, str, bytes]], catalogs: Mapping[str, PriceCatalog],
                  newest: PriceCatalog, stored_costs: Mapping[str, Row]) -> StreamRows:
    """The rows the rules produce from one stream's events ((seq, event id, bytes) in ``seq`` order). Raises
    EventRefused at the first event the rules refuse."""
    rows = empty_rows()
    state: ExecutionState | None = None
    for seq, event_id, raw in events:
        try:
            event = parse_event(decode_event(raw))
            if event.subject != stream_id:
                raise InvalidEvent([("subject", f"is {event.subject!r}, but the event is stored under stream "
                                                f"{stream_id!r}")])
            stored = stored_costs.get(event.id)
            version = stored[_COST_VERSION] if stored is not None else None
            done = apply(state, event, catalogs.get(version, newest) if version is not None else newest)
        except PermanentError as e:
            raise EventRefused(seq, event_id, e) from e
        state = done.state
        for cost in done.costs:
            rows["costs"][cost.event_id] = cost_row(cost)
        for artifact in done.artifacts:
            rows["artifacts"][artifact.artifact_id] = artifact_row(artifact)
    if state is not None:
        rows["executions"][stream_id] = execution_row(state)
        for step_id, step in state.steps.items():
            rows["steps"][step_id] = step_row(stream_id, step)
    return rows


class ProjectionAuditor:
    """Compares each stream's stored rows with the rows its events give; ``check`` once per stream.

    Reports every differing row (its table, key and first differing column), every row missing, every row
    that no event gives, and a stream whose events the rules refuse (then its rows are not compared).
    """

    def __init__(self, catalogs: Mapping[str, PriceCatalog], newest: PriceCatalog) -> None:
        self._catalogs, self._newest = catalogs, newest
        self.events = self.streams = self.rows = 0

    def check(self, stream_id: str, events: list[tuple[int, str, bytes]], stored: StreamRows) -> Iterator[RowFinding]:
        """``events``: the stream's (seq, event id, bytes) in seq order; ``stored``: its rows in the tables."""
        self.streams += 1
        self.events += len(events)
        self.rows += sum(len(rows) for rows in stored.values())
        try:
            expected = expected_rows(stream_id, events, self._catalogs, self._newest, stored["costs"])
        except EventRefused as e:
            yield RowFinding(stream_id, e.seq, e.event_id, "event_refused", f"the rules refuse the stored event "
                             f"({e.error.code}: {e.error}), so the stream's rows cannot be derived",
                             table="audit_log", key=e.event_id)
            return
        for table, (columns, key_column) in TABLES.items():
            yield from _compare(stream_id, table, columns, key_column, expected[table], stored[table])


def _compare(stream_id: str, table: str, columns: tuple[str, ...], key_column: str, expected: Mapping[str, Row],
             stored: Mapping[str, Row]) -> Iterator[RowFinding]:
    seq_at = columns.index("seq") if "seq" in columns else None
    for key in sorted(expected.keys() | stored.keys()):
        want, have = expected.get(key), stored.get(key)
        row = want if want is not None else have
        assert row is not None
        seq = row[seq_at] if seq_at is not None else None
        event_id = key if key_column == "event_id" else None
        where = f"{table} row {key_column}={key!r}" + (f" of stream {stream_id}" if key_column != "stream_id" else "")
        if have is None:
            yield RowFinding(stream_id, seq, event_id, "row_missing",
                             f"{where} is not in the table, but the stream's events give it", table=table, key=key)
        elif want is None:
            yield RowFinding(stream_id, seq, event_id, "row_extra",
                             f"{where} is in the table, but no event of the stream gives it", table=table, key=key)
        else:
            for column, stored_value, expected_value in zip(columns, have, want, strict=True):
                if stored_value != expected_value:
                    yield RowFinding(stream_id, seq, event_id, "row_differs",
                                     f"{where}: {column} is {stored_value!r}, the events give {expected_value!r}",
                                     table=table, key=key)
                    break
