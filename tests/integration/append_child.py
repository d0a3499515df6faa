"""A producer process for the concurrency and crash tests (run as a script, not collected).

usage: append_child.py MODE STREAM COUNT
  MODE ok: append COUNT events one by one;
  die-before-publish / die-after-publish: stage one event, then SIGKILL this process
  just before publishing it, or just after (before the head is committed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runledger.streams.producer.client import EventProducer  # noqa: E402
from runledger.streams.producer.heads import StreamHeads  # noqa: E402
from runledger.streams.settings import Settings  # noqa: E402


def _die(*_: Any, **__: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def main(mode: str, stream_id: str, count: int) -> None:
    async with EventProducer(Settings()) as producer:
        if mode == "die-before-publish":
            producer._publish = _die  # type: ignore[method-assign]  # noqa: SLF001
        elif mode == "die-after-publish":
            StreamHeads.commit = _die  # type: ignore[assignment, method-assign]
        for i in range(count):
            await producer.append(stream_id, "step.started", {"step_id": f"p{os.getpid()}-{i}", "name": "n"})
        print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
