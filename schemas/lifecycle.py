"""The part of an execution's life (SPEC.md section 5) that a stream's head alone decides.

``execution.started`` is seq 1 and only seq 1, and nothing follows a terminal
event. A producer knows its stream's head, so it refuses such an event with the
reason a worker would dead-letter it with, before anything is published. (Step
rules need the steps' states, which only the projection has.)
"""

from __future__ import annotations

from collections.abc import Sequence

from runledger.schemas.errors import IllegalTransition

__all__ = ["STARTED", "TERMINAL_TYPES", "check_lifecycle"]

STARTED = "execution.started"
TERMINAL_TYPES = frozenset({"execution.completed", "execution.failed", "execution.cancelled", "execution.timed_out"})


def check_lifecycle(stream_id: str, head_seq: int, last_type: str | None, types: Sequence[str]) -> None:
    """Raise IllegalTransition if ``types`` cannot follow a stream at ``head_seq`` whose last event is of
    ``last_type`` (None: not known, then only the seq rules apply)."""
    previous = last_type
    for seq, event_type in enumerate(types, start=head_seq + 1):
        why = None
        if previous in TERMINAL_TYPES:
            why = f"the execution already ended ({previous})"
        elif seq == 1 and event_type != STARTED:
            why = "the first event of a stream must be execution.started"
        elif seq > 1 and event_type == STARTED:
            why = "execution.started must be seq 1: the execution has already started"
        if why is not None:
            raise IllegalTransition(f"{event_type} at seq {seq} of {stream_id!r}: {why}")
        previous = event_type
