"""Webhook delivery workers (``runledger webhooks worker``) against the real Kafka and PostgreSQL of the session's
stack and real HTTP receivers on free ports: what matches is delivered as stored, signed, in seq order per stream;
failures are retried on the schedule through the retry topics and hold back only their own endpoint and stream;
dead deliveries are replayed; a worker killed mid-delivery and a PostgreSQL outage lose nothing."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from runledger.projections.postgres.db import connect_one
from runledger.streams.webhooks.messages import msg_id
from tests.conftest import CLI, free_ports
from tests.integration.conftest import (
    poll,
    read_log,
    rechain,
    rehashed,
    running_worker,
    settings_of,
    worker_log,
    write_log,
)
from tests.integration.deadletters.pgproxy import PgProxy
from tests.integration.httpapi.serving import migrated
from tests.integration.receivers import Receiver, receiving
from tests.integration.test_webhook_sender import NODE_DIR

pytestmark = pytest.mark.timeout(240)

WORKER = ("webhooks", "worker")


def hooks(env: dict[str, str], *args: str) -> Any:
    """``runledger webhooks ARGS`` (exit 0): its JSON objects (one: the object; several: a list), or its text."""
    done = subprocess.run([*CLI, "webhooks", *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    if "--json" not in args:
        return done.stdout
    objects = [orjson.loads(line) for line in done.stdout.splitlines() if line]
    return objects if args[0] == "deliveries" else objects[0]


async def delivery_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**await migrated(env), "RUNLEDGER_WEBHOOK_ALLOW_PRIVATE": "true", **extra}


def add(env: dict[str, str], receiver: Receiver, *args: str) -> tuple[str, str]:
    added = hooks(env, "add", receiver.url, *args, "--json")
    return added["endpoint_id"], added["secret"]


async def received(receiver: Receiver, count: int, deadline_s: float = 60.0) -> None:
    async def enough() -> bool:
        return len(receiver.got) >= count

    await poll(enough, deadline_s, f"{count} deliveries (got {len(receiver.got)})")


def by_stream(receiver: Receiver) -> dict[str, list[int]]:
    seqs: defaultdict[str, list[int]] = defaultdict(list)
    for _, body in receiver.got:
        event = orjson.loads(body)
        seqs[event["subject"]].append(event["seq"])
    return dict(seqs)


async def fetch(env: dict[str, str], sql: str, *args: Any) -> list[Any]:
    settings = settings_of(env)
    conn = await connect_one(settings.database_dsn(), settings.db_schema)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def test_every_matching_event_is_delivered_as_stored_verified_and_in_seq_order(env: dict[str, str]) -> None:
    env = await delivery_env(env)
    with receiving() as receiver, receiving() as other:
        endpoint, secret = add(env, receiver, "--streams", "bill-")
        failed_only, other_secret = add(env, other, "--types", "execution.completed")
        streams = [rechain(f"bill-{n}") for n in range(3)]
        fork = rehashed(streams[0][1], time="2026-12-05T00:00:00Z")  # another event at bill-0 seq 2
        await write_log(settings_of(env), [e for events in streams for e in events] + rechain("ops-1") + [fork])
        async with running_worker(env, command=WORKER) as worker:
            await received(receiver, 27)
            await received(other, 4)

            async def said() -> bool:
                return 'runledger_webhook_records_skipped_total{reason="seq_conflict"} 1.0' in scrape(worker)

            await poll(said, 30, "the fork counted")
            assert "bill-0 seq 2 is another event at a seq owed" in worker_log(worker)
        stored = {orjson.loads(r.value)["id"]: r.value for r in await read_log(settings_of(env))}
        for headers, body in receiver.got:
            Webhook(secret).verify(body, headers)
            assert body == stored[orjson.loads(body)["id"]]  # byte for byte as the log holds it
            assert headers["content-type"].startswith("application/cloudevents+json")
        for headers, body in other.got:
            Webhook(other_secret).verify(body, headers)
        assert by_stream(receiver) == {f"bill-{n}": list(range(1, 10)) for n in range(3)}
        assert sorted(by_stream(other)) == ["bill-0", "bill-1", "bill-2", "ops-1"]
        assert {orjson.loads(b)["type"] for _, b in other.got} == {"execution.completed"}
    rows = await fetch(env, "SELECT m.msg_id, m.state, d.attempt, d.status FROM webhook_messages m "
                            "JOIN webhook_deliveries d USING (msg_id) WHERE m.endpoint_id = $1", endpoint)
    assert len(rows) == 27 and {(r["state"], r["attempt"], r["status"]) for r in rows} == {("delivered", 1, 204)}
    assert {h["webhook-id"] for h, _ in receiver.got} == {r["msg_id"] for r in rows}
    assert failed_only != endpoint


def failing_first(stream: str, seq: int, failures: int | None) -> Any:
    """An answer: 500 to ``stream``'s ``seq`` for its first ``failures`` deliveries (None: always), else 204."""
    seen = [0]

    def answer(headers: dict[str, str], body: bytes) -> int:
        event = orjson.loads(body)
        if (event["subject"], event["seq"]) == (stream, seq):
            seen[0] += 1
            if failures is None or seen[0] <= failures:
                return 500
        return 204

    return answer


def arrivals(receiver: Receiver, stream: str) -> list[tuple[float, int, str]]:
    """(time, seq, webhook-id) of each delivery of ``stream``, in arrival order."""
    out = []
    for (headers, body), at in zip(receiver.got, receiver.times, strict=True):
        event = orjson.loads(body)
        if event["subject"] == stream:
            out.append((at, event["seq"], headers["webhook-id"]))
    return out


async def test_a_failing_receiver_gets_the_event_on_the_schedule_and_holds_back_only_its_own_stream(
        env: dict[str, str]) -> None:
    env = await delivery_env(env)  # the seeds' schedule: 1, 2, 4, 8, 16 s, with 10 % jitter
    with receiving() as receiver, receiving() as other:
        receiver.answer = failing_first("slow-1", 1, 3)
        endpoint, _ = add(env, receiver)
        add(env, other)
        await write_log(settings_of(env), rechain("slow-1") + rechain("fast-1"))
        async with running_worker(env, command=WORKER):
            await received(receiver, 18 + 3)
            await received(other, 18)
    slow = arrivals(receiver, "slow-1")
    tries = [at for at, seq, _ in slow if seq == 1]
    assert len(tries) == 4 and len({mid for _, seq, mid in slow if seq == 1}) == 1  # one webhook-id throughout
    for (before, after_), delay in zip(itertools.pairwise(tries), (1.0, 2.0, 4.0), strict=True):
        assert delay * 0.9 - 0.05 <= after_ - before <= delay * 1.1 + 1.5, (delay, after_ - before)
    # The later events of slow-1 wait for seq 1, and then arrive in seq order; nothing else waits for it.
    assert [seq for _, seq, _ in slow] == [1, 1, 1, 1, *range(2, 10)]
    assert all(at > tries[-1] for at, seq, _ in slow if seq > 1)
    assert all(at < tries[1] for at, _, _ in arrivals(receiver, "fast-1"))
    assert all(at < tries[1] for at, _, _ in arrivals(other, "slow-1"))
    rows = await fetch(env, "SELECT d.attempt, d.status, d.outcome FROM webhook_deliveries d JOIN webhook_messages m "
                            "USING (msg_id) WHERE m.endpoint_id = $1 AND m.stream_id = 'slow-1' AND m.seq = 1 "
                            "ORDER BY d.attempt", endpoint)
    assert [tuple(r) for r in rows] == [(1, 500, "retry"), (2, 500, "retry"), (3, 500, "retry"), (4, 204, "delivered")]
    settings = settings_of(env)
    for delay in ("1s", "2s", "4s"):  # each retry went through its retry topic
        copies = await read_log(settings, f"{settings.topic_prefix}.webhooks.retry.{delay}")
        assert [dict(c.headers)["runledger.webhook.attempt"] for c in copies] == [b"2" if delay == "1s" else
                                                                                   b"3" if delay == "2s" else b"4"]


async def test_a_receiver_that_never_recovers_gets_a_dead_delivery_replayed_once_it_is_fixed(
        env: dict[str, str]) -> None:
    env = await delivery_env(env, RUNLEDGER_WEBHOOK_RETRY_DELAYS="0.1,0.2,0.3,0.4,0.5")
    with receiving() as receiver:
        receiver.answer = failing_first("doomed-1", 1, None)
        endpoint, secret = add(env, receiver)
        await write_log(settings_of(env), rechain("doomed-1") + rechain("fine-1"))
        async with running_worker(env, command=WORKER):
            await received(receiver, 6 + 9)

            async def dead() -> list[Any]:
                return hooks(env, "deliveries", "--endpoint", endpoint, "--status", "dead", "--json")  # type: ignore[no-any-return]

            [letter] = await poll(dead, 30, "the dead delivery")
            assert (letter["stream_id"], letter["seq"], letter["attempts"], letter["last_status"]) == (
                "doomed-1", 1, 6, 500)
            settings = settings_of(env)
            [copy] = await read_log(settings, f"{settings.topic_prefix}.webhooks.dlq")
            assert dict(copy.headers)["runledger.webhook.msg_id"] == letter["msg_id"].encode()
            assert [seq for _, seq, _ in arrivals(receiver, "doomed-1")] == [1] * 6  # the rest held back
            receiver.answer = None  # fixed

            dry = hooks(env, "replay", "--endpoint", endpoint, "--dry-run", "--json")
            assert dry["replayed"] == [letter["msg_id"]]
            listed = hooks(env, "deliveries", "--endpoint", endpoint, "--stream", "doomed-1", "--json")
            assert listed[0]["state"] == "dead"  # the dry run changed nothing
            done = hooks(env, "replay", "--endpoint", endpoint, "--yes", "--json")
            assert done["replayed"] == [letter["msg_id"]] and done["replay_id"] is not None
            again = hooks(env, "replay", "--endpoint", endpoint, "--yes", "--json")
            assert again["replayed"] == []  # idempotent: nothing is dead any more, or it is owed already
            await received(receiver, 6 + 9 + 9)
        doomed = arrivals(receiver, "doomed-1")
        assert [seq for _, seq, _ in doomed] == [1] * 7 + list(range(2, 10))
        assert len({mid for _, seq, mid in doomed if seq == 1}) == 1
        for headers, body in receiver.got:
            Webhook(secret).verify(body, headers)
    [audit] = await fetch(env, "SELECT run_by, filter, msg_ids FROM webhook_replays")
    assert audit["msg_ids"] == [letter["msg_id"]] and endpoint in audit["filter"]


def scrape(worker: subprocess.Popen[bytes]) -> str:
    """The worker's Prometheus metrics, from the port its log names."""
    port = re.search(r"Prometheus metrics on port (\d+)", worker_log(worker))
    assert port is not None, worker_log(worker)
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as answer:
        return answer.read().decode()  # type: ignore[no-any-return]


def delivered_once_each_in_order(receiver: Receiver, streams: list[str]) -> None:
    """Every event of ``streams`` arrived, at least once; every copy of a message carries the same webhook-id and
    body; each stream's first arrivals are in seq order."""
    ids: dict[str, bytes] = {}
    for headers, body in receiver.got:
        assert ids.setdefault(headers["webhook-id"], body) == body  # a duplicate is the same message
    for stream in streams:
        firsts: list[int] = []
        for _, seq, _ in arrivals(receiver, stream):
            if seq not in firsts:
                firsts.append(seq)
        assert firsts == list(range(1, 10)), (stream, [seq for _, seq, _ in arrivals(receiver, stream)])


async def test_kill_9_of_a_worker_mid_delivery_loses_nothing_and_duplicates_keep_their_webhook_id(
        env: dict[str, str]) -> None:
    env = await delivery_env(env)
    streams = [f"k9-{n}" for n in range(8)]
    with receiving() as receiver:
        receiver.delay_s = 0.1  # requests are open when the worker dies
        endpoint, _ = add(env, receiver)
        await write_log(settings_of(env), [e for s in streams for e in rechain(s)])
        async with running_worker(env, command=WORKER) as worker:
            await received(receiver, 20)
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
        killed_at = len(receiver.got)
        assert killed_at < 9 * len(streams)  # it died with messages owed
        async with running_worker(env, command=WORKER):
            await received(receiver, killed_at + 1)
            await write_log(settings_of(env), rechain("k9-after"))  # after the restart, write before reading

            async def all_delivered() -> bool:
                rows = await fetch(env, "SELECT count(*) AS n FROM webhook_messages WHERE state = 'delivered'")
                return rows[0]["n"] == 9 * (len(streams) + 1)

            await poll(all_delivered, 60, "every message delivered")
        delivered_once_each_in_order(receiver, [*streams, "k9-after"])
    # Sent before the kill and not recorded: sent again, with the same webhook-id (checked above).
    assert len(receiver.got) > 9 * (len(streams) + 1)
    rows = await fetch(env, "SELECT count(DISTINCT msg_id) AS n FROM webhook_deliveries WHERE endpoint_id = $1 "
                            "AND outcome = 'delivered'", endpoint)
    assert rows[0]["n"] == 9 * (len(streams) + 1)


async def test_postgres_gone_mid_delivery_loses_nothing_and_duplicates_keep_their_webhook_id(
        env: dict[str, str]) -> None:
    env = await delivery_env(env)
    settings = settings_of(env)
    proxy = PgProxy("127.0.0.1", settings.port_of("postgres"))
    await proxy.start()
    through_proxy = {**env, "RUNLEDGER_DATABASE_URL": settings.database_url.replace(
        f":{settings.port_of('postgres')}/", f":{proxy.port}/")}
    streams = [f"pg-{n}" for n in range(8)]
    try:
        with receiving() as receiver:
            receiver.delay_s = 0.1
            add(env, receiver)
            await write_log(settings, [e for s in streams for e in rechain(s)])
            async with running_worker(through_proxy, command=WORKER) as worker:
                await received(receiver, 20)
                await proxy.stop()  # deliveries under way cannot be recorded; nothing new can be read
                await write_log(settings, rechain("pg-during"))
                await asyncio.sleep(5)
                await proxy.start()

                async def all_delivered() -> bool:
                    rows = await fetch(env, "SELECT count(*) AS n FROM webhook_messages WHERE state = 'delivered'")
                    return rows[0]["n"] == 9 * (len(streams) + 1)

                await poll(all_delivered, 90, "every message delivered")
                assert worker.poll() is None  # it waited for PostgreSQL, it did not stop
            delivered_once_each_in_order(receiver, [*streams, "pg-during"])
    finally:
        await proxy.stop()


async def test_an_endpoint_failing_past_the_window_is_disabled_and_gets_what_it_missed_in_order_once_enabled(
        env: dict[str, str]) -> None:
    env = await delivery_env(env, RUNLEDGER_WEBHOOK_RETRY_DELAYS="0.5,1,1.5,2,2.5",
                             RUNLEDGER_WEBHOOK_DISABLE_AFTER_S="2")
    with receiving() as receiver, receiving() as healthy:
        receiver.status = 503
        endpoint, secret = add(env, receiver)
        add(env, healthy)
        await write_log(settings_of(env), rechain("down-1"))
        async with running_worker(env, command=WORKER) as worker:
            async def disabled() -> Any:
                shown = hooks(env, "show", endpoint, "--json")
                return shown if not shown["enabled"] else None

            shown = await poll(disabled, 30, "the endpoint disabled")
            assert "longer than 2 s" in shown["disabled_reason"]
            failed = len(receiver.got)
            await write_log(settings_of(env), rechain("down-2"))  # matches while disabled: kept, not sent
            await received(healthy, 18)

            async def all_pending() -> bool:  # the retry due finds the endpoint disabled: it waits, pending
                return {m["state"] for m in hooks(env, "deliveries", "--endpoint", endpoint, "--json")} == {"pending"}

            await poll(all_pending, 30, "every message of the disabled endpoint pending")
            assert len(receiver.got) == failed
            assert f"webhook endpoint {endpoint} disabled" in worker_log(worker)
            assert "runledger_webhook_endpoints_auto_disabled_total 1.0" in scrape(worker)

            receiver.status = 204  # fixed
            hooks(env, "enable", endpoint, "--json")
            await received(receiver, failed + 18)
        delivered_once_each_in_order(receiver, ["down-1", "down-2"])
        for headers, body in receiver.got:
            Webhook(secret).verify(body, headers)


async def test_the_node_receiver_of_the_docs_verifies_every_delivery_with_the_npm_package(env: dict[str, str]) -> None:
    env = await delivery_env(env)
    [port] = free_ports(1)
    endpoint = hooks(env, "add", f"http://127.0.0.1:{port}/in", "--json")
    node = subprocess.Popen(["node", str(NODE_DIR / "webhook_receiver.mjs")], cwd=NODE_DIR, stdout=subprocess.PIPE,
                            env={**os.environ, "RUNLEDGER_WEBHOOK_SECRET": endpoint["secret"],
                                 "RECEIVER_PORT": str(port)}, text=True)
    try:
        assert node.stdout is not None
        assert orjson.loads(await asyncio.to_thread(node.stdout.readline))["port"] == port
        events = rechain("node-1")
        await write_log(settings_of(env), events)
        async with running_worker(env, command=WORKER):
            lines = [orjson.loads(await asyncio.to_thread(node.stdout.readline)) for _ in events]
    finally:
        node.terminate()
        node.wait(10)
        if node.stdout is not None:
            node.stdout.close()
    assert all(line["verified"] for line in lines), lines
    assert [line["type"] for line in lines] == [e["type"] for e in events]  # in seq order
    assert [line["id"] for line in lines] == [msg_id(endpoint["endpoint_id"], e["hash"]) for e in events]


async def test_an_endpoint_gets_at_most_its_concurrency_of_requests_at_once(env: dict[str, str]) -> None:
    env = await delivery_env(env, RUNLEDGER_WEBHOOK_CONCURRENCY="3")
    streams = [f"many-{n}" for n in range(8)]
    with receiving() as receiver:
        receiver.delay_s = 0.1
        add(env, receiver)
        await write_log(settings_of(env), [e for s in streams for e in rechain(s)])
        async with running_worker(env, command=WORKER):
            await received(receiver, 9 * len(streams))
    assert receiver.most_open == 3  # streams go side by side, three at a time, never more
    delivered_once_each_in_order(receiver, streams)


async def test_a_retry_after_longer_than_its_topic_s_delay_is_honoured(env: dict[str, str]) -> None:
    env = await delivery_env(env, RUNLEDGER_WEBHOOK_RETRY_DELAYS="0.2,0.4,0.6,0.8,1")
    with receiving() as receiver:
        busy = [True]

        def answer(headers: dict[str, str], body: bytes) -> int:  # 503 with Retry-After: 3 once, then 204
            if busy[0]:
                busy[0] = False
                return 503
            receiver.headers = {}
            return 204

        receiver.headers = {"Retry-After": "3"}
        receiver.answer = answer
        add(env, receiver)
        await write_log(settings_of(env), rechain("later-1"))
        async with running_worker(env, command=WORKER):
            await received(receiver, 10)
    tries = [at for at, seq, _ in arrivals(receiver, "later-1") if seq == 1]
    assert len(tries) == 2 and 2.9 <= tries[1] - tries[0] <= 3 + 2.0, tries  # not the topic's 0.2 s


async def test_two_copies_of_one_attempt_are_recorded_once(env: dict[str, str]) -> None:
    from runledger.projections.postgres.db import connect
    from runledger.streams.webhooks.delivery import Outcome, Recorder
    from runledger.streams.webhooks.schedule import Next
    from runledger.streams.webhooks.sender import Attempt

    env = await delivery_env(env)
    settings = settings_of(env)
    endpoint, _ = add(env, Receiver())
    event = rechain("dup-1")[0]
    mid = msg_id(endpoint, event["hash"])
    pool = await connect(settings.database_dsn(), settings.db_schema)
    try:
        await pool.execute(
            "INSERT INTO webhook_messages (msg_id, endpoint_id, stream_id, seq, event_id, event_type, event_hash, "
            "event_time, log_partition, log_offset, body) VALUES ($1, $2, 'dup-1', 1, $3, $4, $5, now(), 0, 0, $6)",
            mid, endpoint, event["id"], event["type"], event["hash"], orjson.dumps(event))
        published: list[int] = []

        async def publish() -> None:
            published.append(1)

        recorder = Recorder(pool, settings, publish)
        at = datetime.now(UTC)
        failed = Outcome(mid, endpoint, "dup-1", 1, 1, at, Attempt(503, 0.01), Next("retry", 1.0, "busy"))
        moved = await asyncio.gather(recorder.record([failed]), recorder.record([failed]))
        assert moved == [{mid}, {mid}]
        again = await recorder.record([failed])  # a copy recorded after: moves nothing, refuses nothing
        assert again == set()
        await recorder.stop()
        rows = await pool.fetch("SELECT attempt, outcome FROM webhook_deliveries WHERE msg_id = $1", mid)
        assert [tuple(r) for r in rows] == [(1, "retry")]
        copies = await pool.fetch("SELECT topic FROM outbox")
        assert [r["topic"] for r in copies] == [f"{settings.topic_prefix}.webhooks.retry.1s"] and published
    finally:
        await pool.close()


async def test_a_retrying_message_whose_copy_is_lost_is_sent_again(env: dict[str, str]) -> None:
    """Its retry topic no longer read (the delays changed) or kept for less than the workers were away: 10 minutes
    past due, the message is pending again and the dispatcher sends it, before the rest of its stream."""
    env = await delivery_env(env)
    with receiving() as receiver:
        endpoint, secret = add(env, receiver)
        events = rechain("lost-1")
        await write_log(settings_of(env), events[:1])
        async with running_worker(env, command=WORKER):
            await received(receiver, 1)
        [(_, first)] = receiver.got
        settings = settings_of(env)
        conn = await connect_one(settings.database_dsn(), settings.db_schema)
        try:  # as if its first attempt had failed, and the copy for its retry topic were lost
            await conn.execute("UPDATE webhook_messages SET state = 'retrying', due_at = now() - interval '20 min' "
                               "WHERE endpoint_id = $1", endpoint)
        finally:
            await conn.close()
        await write_log(settings, events[1:3])
        async with running_worker(env, command=WORKER) as worker:
            await received(receiver, 4)
            assert "retrying messages whose copy did not come back" in worker_log(worker)
    assert [seq for _, seq, _ in arrivals(receiver, "lost-1")] == [1, 1, 2, 3]
    assert receiver.got[1][1] == first
    Webhook(secret).verify(receiver.got[1][1], receiver.got[1][0])
