"""Publishing a staged batch to the log: in order, chunk by chunk, each acknowledged; a batch the broker refuses for
good settled against what the log holds (``EventProducer`` and its sweep publish through it)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedForMessageFormatError,
)

from runledger.schemas.errors import PermanentError, TransientError
from runledger.streams.producer.heads import StagedBatch, StreamHeads
from runledger.streams.producer.recovery import stream_in_log
from runledger.streams.settings import Settings

__all__ = ["CHUNK_BYTES", "CONTENT_TYPE", "LogPublisher", "PublishFailed", "PublishRefused"]

CONTENT_TYPE = b"application/cloudevents+json; charset=UTF-8"
CHUNK_BYTES = 512 * 1024  # sent, then acknowledged, at a time


class PublishFailed(TransientError):
    """The broker did not acknowledge a staged batch. Its outcome is unknown, but it is not lost: the
    sweeper (one producer or worker, every ``RUNLEDGER_PRODUCER_SWEEP_S``), or else the next append to
    the stream, publishes it again (same ids and hashes). Retrying with the same idempotency key returns
    the events once they are in."""

    code = "publish_failed"


class PublishRefused(PermanentError):
    """The broker refuses the batch for good (too large for it, no such topic, not authorised): nothing of
    it from ``seq`` on is in the log, and it is not kept. Fix the cause, then append again."""

    code = "publish_refused"

    def __init__(self, message: str, acked: int) -> None:
        self.acked = acked  # how many leading events of the batch the broker took before it refused
        super().__init__(message)


# What the broker will refuse again however often it is asked.
_REFUSALS = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError, InvalidTopicError,
             TopicAuthorizationFailedError, ClusterAuthorizationFailedError, UnsupportedForMessageFormatError,
             CorruptRecordException)


class LogPublisher:
    """Publishes staged batches of the log topic with ``kafka``; settles refused ones in ``heads``."""

    def __init__(self, kafka: AIOKafkaProducer, heads: StreamHeads, settings: Settings) -> None:
        self._kafka, self._heads, self._settings = kafka, heads, settings

    async def publish(self, stream_id: str, batch: StagedBatch) -> None:
        """Send in order and wait for every acknowledgement, chunk by chunk. Raises PublishFailed (transient:
        the batch stays staged) or PublishRefused (permanent: the part the broker did not take is dropped,
        the part it took is committed)."""
        key, topic = stream_id.encode(), self._settings.events_topic
        headers = [("content-type", CONTENT_TYPE)]
        sent, futures = 0, list[asyncio.Future[Any]]()
        try:
            while sent < len(batch.values):
                size, end = 0, sent
                while end < len(batch.values) and (end == sent or size < CHUNK_BYTES):
                    size += len(batch.values[end])
                    end += 1
                futures = []
                for value in batch.values[sent:end]:
                    futures.append(await self._kafka.send(topic, value, key=key, headers=headers))
                for future in futures:
                    await future
                sent = end
        except _REFUSALS as e:
            await asyncio.gather(*futures, return_exceptions=True)  # what the broker takes, it takes
            await self._settle(stream_id, batch, e)
        except KafkaError as e:
            raise PublishFailed(f"stream {stream_id!r}: publishing seq {batch.refs[0].seq}.."
                                f"{batch.refs[-1].seq} failed: {e}") from e

    async def _settle(self, stream_id: str, batch: StagedBatch, error: KafkaError) -> None:
        """The broker refuses ``batch`` for good: keep what of it the log holds (read it back: an earlier
        attempt, or part of this one, may have landed), drop the rest. Raises PublishRefused."""
        try:
            in_log = await stream_in_log(self._settings, stream_id)
        except TransientError as e:  # cannot tell what landed: keep it staged, the sweeper tries again
            raise PublishFailed(f"stream {stream_id!r}: the broker refuses seq {batch.refs[0].seq}.."
                                f"{batch.refs[-1].seq} ({error}), and the log cannot be read to settle it: {e}"
                                ) from error
        landed = [(ref.seq, ref.hash) in in_log for ref in batch.refs]
        if all(landed):  # an earlier attempt put it all in the log
            await self._heads.commit(stream_id, "", batch)
            return
        kept = landed.index(False)
        what = f"stream {stream_id!r}: the broker refuses seq {batch.refs[kept].seq}..{batch.refs[-1].seq} for good " \
               f"({type(error).__name__}: {error})"
        if any(landed[kept:]):  # a later event landed without an earlier one: nothing may reuse those seqs
            raise PublishRefused(f"{what}; the log holds some of them but not seq {batch.refs[kept].seq}: the "
                                 "batch stays staged (the stream is blocked) until an operator settles it",
                                 kept) from error
        if kept:
            await self._heads.commit(stream_id, "", batch.prefix(kept))
        else:
            await self._heads.discard(stream_id, batch.batch_id)
        raise PublishRefused(f"{what}; " + (f"seq ..{batch.refs[kept - 1].seq} are in the log; " if kept else "")
                             + "the rest is not kept", kept) from error
