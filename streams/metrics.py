"""runledger's Prometheus metrics, in one place: names, units, labels, and the HTTP endpoint that serves them.

Names follow Prometheus' conventions: the ``runledger_`` prefix, base units (seconds, records, bytes) in the
name, ``_total`` on counters (prometheus-client adds it), and labels from small fixed sets (a partition, a
retry delay, a reason code), never a stream or an event id. A worker serves them on
``RUNLEDGER_METRICS_PORT`` (the next free port if several workers share a host); the producer library counts
into the same registry, which the program that embeds it serves as it likes (``serve``).

Counters and histograms count what this process did. The gauges read from PostgreSQL (outbox backlog, open
dead letters, replays, checkpoints) are the same in every worker: aggregate them with ``max``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:  # the producer library counts here too, and imports nothing of the projection
    from runledger.projections.records import BatchResult

__all__ = ["declare", "observe_batch", "observe_state", "serve"]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

RECORDS = Counter("runledger_records_consumed", "Records read from the log or a retry topic and applied in a batch",
                  ["source"])
PROJECTED = Counter("runledger_events_projected", "Events projected (each once, whatever the deliveries)")
DUPLICATES = Counter("runledger_events_duplicate", "Deliveries of an event already projected, skipped")
PARKED = Counter("runledger_events_parked", "Events that came before their predecessor and wait for it")
RETRIED = Counter("runledger_events_retried", "Events sent to a retry topic, by its delay", ["delay"])
DEAD_LETTERED = Counter("runledger_dead_letters", "Events dead-lettered, by reason code", ["reason"])
CHAIN_VIOLATIONS = Counter("runledger_chain_violations", "Events refused because they break their stream's hash "
                           "chain (chain_broken, seq_conflict, hash_mismatch)", ["code"])
TRANSACTIONS = Counter("runledger_store_transactions", "PostgreSQL transactions the applied batches took, rolled "
                       "back ones included: more than the batches when a record PostgreSQL refused was isolated by "
                       "applying halves, or a conflict was retried")
BATCH_RECORDS = Histogram("runledger_batch_records", "Records per applied batch",
                          buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
BATCH_SECONDS = Histogram("runledger_batch_commit_seconds", "Time to apply and commit one batch in PostgreSQL",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
LOCK_WAIT = Histogram("runledger_batch_lock_wait_seconds", "Time one committed batch spent taking its locks (the "
                      "apply lock, its streams', its partitions' tree rows), its attempts that timed out included",
                      buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0))
LOCK_TIMEOUTS = Counter("runledger_batch_lock_timeouts", "Batch attempts that gave up waiting for a lock "
                        "(RUNLEDGER_DB_LOCK_TIMEOUT_S) and were tried again in place")
LATENCY = Histogram("runledger_event_latency_seconds", "From an event's time to the commit of the batch that "
                    "projected it", buckets=_LATENCY_BUCKETS)
LAG = Gauge("runledger_consumer_lag_records", "Records of the log this worker has not projected and committed yet, "
            "per partition it holds", ["partition"])
RETRY_DEPTH = Gauge("runledger_retry_topic_depth_records", "Records waiting in a retry topic, by its delay",
                    ["delay"])
FORWARDED = Counter("runledger_batches_forwarded", "Batches sent whole to the retry topics because PostgreSQL was "
                    "unavailable")
STORE_READ = Gauge("runledger_store_read_timestamp_seconds", "When this worker last read its gauges from PostgreSQL "
                   "(Unix time): stale while the database is unreachable")
WORKERS_LIVE = Gauge("runledger_workers_live", "Workers whose heartbeat PostgreSQL saw in the last 10 s")
OUTBOX = Gauge("runledger_outbox_backlog_records", "Copies for the retry and dead-letter topics not yet published")
DEAD_OPEN = Gauge("runledger_dead_letters_open", "Dead letters neither replayed nor resolved")
REPLAY_RUNS = Gauge("runledger_replay_runs", "Dead-letter replay runs recorded")
REPLAY_RECORDS = Gauge("runledger_replay_records", "Dead letters replayed, by outcome", ["outcome"])
TREE_SIZE = Gauge("runledger_tlog_size_events", "Records in the transparency logs (all partitions of the log topic)")
TREE_FINDINGS = Gauge("runledger_tree_findings", "Disagreements the signer found between PostgreSQL's trees and "
                      "the log")
TREE_DISAGREEMENTS = Counter("runledger_tree_disagreements", "Partitions whose tree in PostgreSQL disagreed with the "
                             "one the signer derived from the log", ["partition"])
SIGNER_KEY_ERRORS = Counter("runledger_signer_key_errors", "Signer rounds a worker could not run because its "
                            "checkpoint key could not be used: unreadable (the file cannot be read) or invalid "
                            "(read, but not a key it may sign with)", ["reason"])
CHECKPOINT_SIZE = Gauge("runledger_checkpoint_size_events", "Records the newest signed checkpoints of all partitions "
                        "cover")
CHECKPOINT_TIME = Gauge("runledger_checkpoint_timestamp_seconds", "When the newest checkpoint was signed (Unix time; "
                        "0: none yet)")
VERIFY_TIME = Gauge("runledger_verify_timestamp_seconds", "When the last `runledger verify` of a check ended (Unix "
                    "time)", ["check"])
VERIFY_FINDINGS = Gauge("runledger_verify_findings", "Findings of the last `runledger verify` of a check (0: intact)",
                        ["check"])
VERIFY_EVENTS = Gauge("runledger_verify_events", "Events the last `runledger verify` of a check covered", ["check"])
APPENDS = Counter("runledger_appends", "Events a producer appended to the log, by outcome", ["outcome"])
APPEND_SECONDS = Histogram("runledger_append_seconds", "Time of one append call (a batch of one stream's events), "
                           "lease wait included", buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                                           2.5, 5.0, 10.0, 30.0))
LEASE_WAIT_SECONDS = Histogram("runledger_lease_wait_seconds", "Time an append waited for its stream's lease",
                               buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0))
HTTP_REQUESTS = Counter("runledger_http_requests", "Requests `runledger serve` answered, by route template (not the "
                        "path: no stream id), method and status", ["route", "method", "status"])
HTTP_SECONDS = Histogram("runledger_http_request_seconds", "From a request's start to its response's end, by route "
                         "template", ["route"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                         1.0, 2.5, 5.0, 10.0, 30.0))
HTTP_REFUSALS = Counter("runledger_http_refusals", "Requests `runledger serve` refused, by the problem's code "
                        "(signature_invalid, rate_limited, body_too_large, unavailable, ...)", ["reason"])

HTTP_APPENDS = Counter("runledger_http_append_requests", "Append requests `serve` answered, by mode (simple, "
                       "structured, batched, binary) and outcome (appended, duplicate: every event appended before, "
                       "pending: staged, Kafka's acknowledgement not received (202), refused: 4xx, unavailable: 503, "
                       "failed: other 5xx)", ["mode", "outcome"])
HTTP_APPENDED_EVENTS = Counter("runledger_http_appended_events", "Events `serve` appended, by mode and outcome "
                               "(appended, duplicate)", ["mode", "outcome"])

WEBHOOK_ATTEMPTS = Counter("runledger_webhook_attempts", "Webhook delivery attempts, by what followed (delivered: "
                           "a 2xx; retry: sent to a retry topic; dead: to the deliveries' dead-letter topic)",
                           ["outcome"])
WEBHOOK_ATTEMPT_SECONDS = Histogram("runledger_webhook_attempt_seconds", "From a delivery attempt's start to the "
                                    "receiver's whole answer (or the timeout)", buckets=_LATENCY_BUCKETS)
WEBHOOK_DELIVERY_SECONDS = Histogram("runledger_webhook_delivery_seconds", "From an event's time to the receiver's "
                                     "2xx for it", buckets=_LATENCY_BUCKETS)
WEBHOOK_MESSAGES = Counter("runledger_webhook_messages", "Messages owed to webhook endpoints, read from the log")
WEBHOOK_SKIPPED = Counter("runledger_webhook_records_skipped", "Log records no endpoint is owed because they are "
                          "not events (the projection dead-letters them), by reason", ["reason"])
WEBHOOK_DISABLED = Counter("runledger_webhook_endpoints_auto_disabled", "Endpoints a delivery worker disabled "
                           "because they kept failing for longer than RUNLEDGER_WEBHOOK_DISABLE_AFTER_S")
WEBHOOK_OWED = Gauge("runledger_webhook_messages_owed", "Messages pending or retrying, of every endpoint")
WEBHOOK_DEAD = Gauge("runledger_webhook_messages_dead", "Dead deliveries not replayed")
WEBHOOK_ENDPOINTS = Gauge("runledger_webhook_endpoints", "Endpoints failing (their last attempt failed) and "
                          "disabled", ["state"])

for _outcome in ("appended", "duplicate", "refused", "failed"):
    APPENDS.labels(_outcome)
for _mode in ("simple", "structured", "batched", "binary"):
    for _outcome in ("appended", "duplicate", "pending", "refused", "unavailable", "failed"):
        HTTP_APPENDS.labels(_mode, _outcome)
    for _outcome in ("appended", "duplicate"):
        HTTP_APPENDED_EVENTS.labels(_mode, _outcome)

_CHAIN_CODES = ("chain_broken", "seq_conflict", "hash_mismatch")
_SIGNER_KEY_REASONS = ("unreadable", "invalid")
_DEAD_LETTER_REASONS = ("invalid_json", "invalid_event", "unknown_type", "too_large", "hash_mismatch",
                        "chain_broken", "seq_conflict", "id_conflict", "illegal_transition",
                        "retries_exhausted", "rejected_by_database", "processing_failed")


def declare(delays: Iterable[str] = ()) -> None:
    """Create a worker's labelled series at 0 before their first event: Prometheus' ``increase`` cannot see a
    counter's first increment if the series is born at 1. ``delays``: the retry delays' names. (The producer's
    are created on import.)"""
    for source in ("log", "retry"):
        RECORDS.labels(source)
    for reason in _DEAD_LETTER_REASONS:
        DEAD_LETTERED.labels(reason)
    for code in _CHAIN_CODES:
        CHAIN_VIOLATIONS.labels(code)
    for reason in _SIGNER_KEY_REASONS:
        SIGNER_KEY_ERRORS.labels(reason)
    for delay in delays:
        RETRIED.labels(delay)
        RETRY_DEPTH.labels(delay)


def declare_webhooks() -> None:
    """A delivery worker's labelled series, at 0 (see ``declare``)."""
    for outcome in ("delivered", "retry", "dead"):
        WEBHOOK_ATTEMPTS.labels(outcome)
    for state in ("failing", "disabled"):
        WEBHOOK_ENDPOINTS.labels(state)


def observe_webhooks(row: Mapping[str, Any]) -> None:
    """The delivery gauges, from a ``webhook_gauges`` row."""
    WEBHOOK_OWED.set(row["owed"])
    WEBHOOK_DEAD.set(row["dead"])
    WEBHOOK_ENDPOINTS.labels("failing").set(row["failing"])
    WEBHOOK_ENDPOINTS.labels("disabled").set(row["disabled"])


def observe_batch(result: BatchResult, source: str, records: int, seconds: float,
                  delays: Sequence[str], times: Iterable[datetime], lock_wait_s: float) -> None:
    """Count one applied batch: ``records`` read from ``source`` (log or retry), applied in ``seconds``, of which
    ``lock_wait_s`` taking its locks; ``delays``: the retry delay of each event sent to a retry topic; ``times``:
    the projected events' times."""
    RECORDS.labels(source).inc(records)
    BATCH_RECORDS.observe(records)
    BATCH_SECONDS.observe(seconds)
    LOCK_WAIT.observe(lock_wait_s)
    TRANSACTIONS.inc(result.transactions)
    PROJECTED.inc(len(result.projected))
    DUPLICATES.inc(result.duplicates)
    PARKED.inc(result.parked)
    for delay in delays:
        RETRIED.labels(delay).inc()
    for failure in result.dead:
        DEAD_LETTERED.labels(failure.error.code).inc()
        if failure.error.code in _CHAIN_CODES:
            CHAIN_VIOLATIONS.labels(failure.error.code).inc()
    now = datetime.now(UTC)
    for moment in times:
        LATENCY.observe(max((now - moment).total_seconds(), 0.0))


def observe_state(row: Mapping[str, Any]) -> None:
    """The gauges kept in PostgreSQL, from a ``metrics_state`` row."""
    STORE_READ.set_to_current_time()
    WORKERS_LIVE.set(row["workers_live"])
    OUTBOX.set(row["outbox"])
    DEAD_OPEN.set(row["dead_open"])
    REPLAY_RUNS.set(row["replay_runs"])
    for outcome, count in row["replayed"].items():
        REPLAY_RECORDS.labels(outcome).set(count)
    TREE_SIZE.set(row["tree_size"] or 0)
    TREE_FINDINGS.set(row["tree_findings"] or 0)
    CHECKPOINT_SIZE.set(row["checkpoint_size"] or 0)  # none signed yet: 0, so "no checkpoint for long" fires
    CHECKPOINT_TIME.set(float(row["checkpoint_time"] or 0))
    for check, last in row["verified"].items():
        VERIFY_TIME.labels(check).set(float(last["at"]))
        VERIFY_FINDINGS.labels(check).set(last["findings"])
        VERIFY_EVENTS.labels(check).set(last["events"])


def serve(host: str, port: int, *, tries: int = 20) -> int:
    """Serve the metrics over HTTP on ``port``, or the first free one of the ``tries`` ports from it (several
    workers on one host); returns the port. Raises OSError if none is free, or the address cannot be used."""
    last = min(port + tries, 65536)
    for candidate in range(port, last):
        try:
            start_http_server(candidate, addr=host)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                continue
            raise
        return candidate
    raise OSError(errno.EADDRINUSE, f"no free port for the metrics in {port}..{last - 1} on {host}")
