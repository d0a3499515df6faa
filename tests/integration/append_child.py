"""A producer process for the concurrency and crash tests (run as a script, not collected).

usage: append_child.py MODE STREAM COUNT
  MODE ok: append COUNT events one by one;
  retry: append COUNT events one by one, each checked first and appended as ``append_many`` does, each with an
  idempotency key, again after a TransientError (for up to 120 s), printing ``acked ID`` for each;
  die-before-publish / die-after-publish: stage one event, then SIGKILL this process
  just before publishing it, or just after (before the head is committed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runledger.schemas.errors import TransientError  # noqa: E402
from runledger.streams.producer.client import EventProducer  # noqa: E402
from runledger.streams.producer.events import NewEvent  # noqa: E402
from runledger.streams.producer.heads import StreamHeads  # noqa: E402
from runledger.streams.settings import Settings  # noqa: E402


def _die(*_: Any, **__: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def main(mode: str, stream_id: str, count: int) -> None:
    async with EventProducer(Settings()) as producer:
        if mode == "die-before-publish":
            producer._publisher.publish = _die  # type: ignore[method-assign]  # noqa: SLF001
        elif mode == "die-after-publish":
            StreamHeads.commit = _die  # type: ignore[assignment, method-assign]
        elif mode == "retry":
            for i in range(count):
                await _append_until_acked(producer, stream_id, NewEvent(
                    "step.started", {"step_id": f"p{os.getpid()}-{i}", "name": "n"}, f"{os.getpid()}-{i}"))
            return
        for i in range(count):
            await producer.append(stream_id, "step.started", {"step_id": f"p{os.getpid()}-{i}", "name": "n"})
        print("done", flush=True)


async def _append_until_acked(producer: EventProducer, stream_id: str, event: NewEvent) -> None:
    failing_since = time.monotonic()
    while True:
        try:
            await producer.precheck(stream_id, [event])
            [appended] = await producer.append_batch(stream_id, [event])
        except TransientError as e:
            if time.monotonic() > failing_since + 120:
                raise
            print(f"retrying: {e}", file=sys.stderr, flush=True)
            await asyncio.sleep(0.1)
            continue
        print("acked", appended.id, flush=True)
        return


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
