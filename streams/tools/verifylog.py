"""``runledger verify log``: every hash and link of the log topic recomputed from its records, without the database.

Reads every partition of ``<prefix>.events`` from its start up to where it ends when the check starts (so the
check ends while producers keep appending), with a consumer of no group that commits nothing, and hands the records to
the pure ``LogAuditor``. It proves the log itself, the source every projection is made from; ``verify chains``
proves what PostgreSQL stored of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from runledger.projections.postgres.verify import ChainReport
from runledger.schemas.errors import PermanentError, TransientError
from runledger.schemas.verify import Finding, LogAuditor
from runledger.streams.kafka import read_to_end, stop_consumer
from runledger.streams.settings import Settings

__all__ = ["LogMissing", "LogReport", "verify_log"]

_FETCH = 10_000  # records one fetch returns at most
_STALLED_S = 60.0  # no record for this long while a partition is not read to its end: give up


class LogMissing(PermanentError):
    """The log topic does not exist: check that RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS and RUNLEDGER_TOPIC_PREFIX name
    the deployment whose log is to be checked."""

    code = "log_missing"


@dataclass(slots=True)
class LogReport(ChainReport):
    """A chain report of the log topic, with the records read and how many of its events were retried copies."""

    records: int = 0
    duplicates: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**ChainReport.as_dict(self), "records": self.records, "duplicates": self.duplicates}


async def verify_log(settings: Settings, progress: Callable[[int, int], None] | None = None) -> LogReport:
    """Check every stream of ``settings.events_topic`` from the start of each partition (module docstring).

    ``progress``: called with (records read, records to read). Raises LogMissing if the topic does not exist,
    TransientError if Kafka cannot be read.
    """
    report = LogReport()
    started, cpu = time.perf_counter(), time.process_time()
    auditor = LogAuditor()
    topic = settings.events_topic
    # auto_offset_reset="none": records deleted while they are read fail the check instead of being skipped.
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="none",
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    try:
        await consumer.start()
        await consumer._client.force_metadata_update()  # noqa: SLF001 - every topic: this consumer subscribes none
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise LogMissing(f"topic {topic} does not exist at {settings.kafka_bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        for tp in tps:
            if starts[tp] > 0:
                report.findings.append(Finding(
                    "", None, None, "log_start_deleted", f"partition {tp.partition} starts at offset {starts[tp]}: "
                    "the records before it were deleted (retention), so its streams cannot be checked from their "
                    "start", tp.partition, starts[tp]))
            consumer.seek(tp, starts[tp])
        def take(tp: TopicPartition, messages: list[Any]) -> None:
            report.findings.extend(auditor.check(messages))

        def read(ends: dict[TopicPartition, int]) -> None:
            if progress is not None:
                progress(auditor.records, sum(end - starts[tp] for tp, end in ends.items()))

        await read_to_end(consumer, tps, take, stalled_s=_STALLED_S, max_records=_FETCH, progress=read)
        report.findings += auditor.finish()
    except KafkaError as e:
        raise TransientError(f"cannot read {topic} at {settings.kafka_bootstrap_servers}: {e}") from e
    finally:
        await stop_consumer(consumer)
    report.events, report.streams = auditor.events, auditor.streams
    report.records, report.duplicates = auditor.records, auditor.duplicates
    report.seconds, report.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    return report
