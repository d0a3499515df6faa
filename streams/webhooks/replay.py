"""``runledger webhooks deliveries`` and ``replay``: what became of the messages owed, and sending them again.

A replay makes delivered or dead messages owed again (pending): the delivery worker that holds their log
partition sends them in seq order, before anything later of their (endpoint, stream), with their ``webhook-id``
unchanged and their retries counted afresh. A message still pending or retrying is owed already and is left as it
is, so a replay run twice sends once. Each replay that changes something is kept in ``webhook_replays`` (who,
which filter, which messages).
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import asyncpg

from runledger.projections.postgres.queries import query

__all__ = ["STATES", "Selection", "replay", "select_messages"]

STATES = ("pending", "retrying", "delivered", "dead")


@dataclass(frozen=True, slots=True)
class Selection:
    """Which messages: by id, or of an endpoint, by state, stream, seq range and since when they were owed."""

    ids: tuple[str, ...] = ()
    endpoint_id: str | None = None
    states: tuple[str, ...] = ()
    stream_id: str | None = None
    from_seq: int | None = None
    to_seq: int | None = None
    since: datetime | None = None
    limit: int = 1000

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v not in (None, (), [])}
        if self.since is not None:
            out["since"] = self.since.isoformat()
        return out


async def select_messages(conn: asyncpg.Connection, sel: Selection, *, attempts: bool = False
                          ) -> list[dict[str, Any]]:
    """The messages ``sel`` picks, each with its last attempt (``attempts``: every attempt)."""
    rows = await conn.fetch(query("webhook_messages_select"), list(sel.ids) or None, sel.endpoint_id,
                            list(sel.states) or None, sel.stream_id, sel.from_seq, sel.to_seq, sel.since, sel.limit)
    out = [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in dict(r).items()} for r in rows]
    if attempts and out:
        each: dict[str, list[dict[str, Any]]] = {}
        for a in await conn.fetch(query("webhook_attempts"), [m["msg_id"] for m in out]):
            item = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in dict(a).items()}
            each.setdefault(item.pop("msg_id"), []).append(item)
        for m in out:
            m["attempts_made"] = each.get(m["msg_id"], [])
    return out


async def replay(conn: asyncpg.Connection, ids: list[str], sel: Selection) -> tuple[list[str], int | None]:
    """Make ``ids`` owed again where they are delivered or dead; returns those made owed and the replay's id in
    ``webhook_replays`` (None: nothing changed, nothing kept). ``conn``: with jsonb as Python objects."""
    async with conn.transaction():
        replayed = [r["msg_id"] for r in await conn.fetch(query("webhook_replay"), ids)]
        if not replayed:
            return [], None
        row = await conn.fetchrow(query("webhook_replay_audit"), f"{getpass.getuser()}@{socket.gethostname()}",
                                  sel.as_dict(), replayed)
    return replayed, row["id"]
