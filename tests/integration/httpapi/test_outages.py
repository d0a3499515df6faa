"""Kafka, Redis and PostgreSQL each stopped in turn under a real ``runledger serve`` while signed appends flow: only
503s with ``Retry-After`` (or 2xx for what still works), appends again once it is back without restarting
``serve``, every append answered 2xx in the log exactly once, nothing in it from a request answered otherwise; and
``serve`` started while Kafka and Redis are down answers, with /readyz 503 until they are up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from runledger.streams.dev import devstack
from tests.conftest import free_ports
from tests.integration.conftest import poll, read_log, settings_of
from tests.integration.httpapi.serving import Served, migrated, serving, signed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture
def own_broker_and_redis(tmp_path: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The session's PostgreSQL; a broker with its log on disk, and Redis (append-only file), of this test's own:
    stopped and started again by the test."""
    kafka, redis = free_ports(2)
    env = {**env, "RUNLEDGER_STATE_DIR": str(tmp_path), "RUNLEDGER_EMBEDDED": "kafka,redis",
           "RUNLEDGER_KAFKA_STORAGE": "s3", "RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}",
           "RUNLEDGER_REDIS_URL": f"redis://127.0.0.1:{redis}/0"}
    devstack.up(settings_of(env))
    yield env
    devstack.down(settings_of(env), purge=True)


def _source(served: Served) -> str:
    done = served.run("sources", "add", "fleet", "--source", "/producers/fleet", "--append-prefix", "",
                      "--read-prefix", "", "--rate", "100000", "--burst", "100000", "--json")
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["secret"])


@dataclass
class Answer:
    stream: str
    status: int | None  # None: no answer (the client gave up)
    retry_after: str | None
    body: dict[str, object]
    at: float


@dataclass
class Traffic:
    """A loop of signed appends, each one ``execution.started`` to a new stream, with its own webhook-id."""

    served: Served
    secret: str
    answers: list[Answer] = field(default_factory=list)
    stopped: bool = False

    async def run(self) -> None:
        """A request every 25 ms, each on its own: one that waits does not hold up the next."""
        async with httpx.AsyncClient(timeout=90, limits=httpx.Limits(max_connections=200)) as client:
            async def one() -> None:
                stream = f"out-{uuid.uuid4().hex[:16]}"
                body = orjson.dumps({"type": "execution.started", "data": {"workflow": "w"}})
                try:
                    r = await client.post(f"{self.served.url}/v1/streams/{stream}/events", content=body,
                                          headers={"content-type": "application/json",
                                                   **signed(self.secret, "fleet", body)})
                except httpx.HTTPError:
                    self.answers.append(Answer(stream, None, None, {}, time.monotonic()))
                    return
                self.answers.append(Answer(stream, r.status_code, r.headers.get("retry-after"), r.json(),
                                           time.monotonic()))

            sent = []
            while not self.stopped:
                sent.append(asyncio.create_task(one()))
                await asyncio.sleep(0.025)
            await asyncio.gather(*sent)

    def since(self, at: float) -> list[Answer]:
        return [a for a in self.answers if a.at >= at]


@contextlib.asynccontextmanager
async def flowing(served: Served, secret: str) -> AsyncIterator[Traffic]:
    traffic = Traffic(served, secret)
    task = asyncio.create_task(traffic.run())
    try:
        await poll(lambda: asyncio.sleep(0, sum(a.status == 201 for a in traffic.answers) >= 20), 60,
                   "appends under way")
        yield traffic
    finally:
        traffic.stopped = True
        await asyncio.wait_for(task, 120)


async def _outage(traffic: Traffic, stop: Callable[[], None], start: Callable[[], None], *, down_s: float = 6.0
                  ) -> list[Answer]:
    """Stop a service for ``down_s`` seconds under ``traffic``, then start it again and wait until appends
    succeed again; the answers from its stop on."""
    await asyncio.to_thread(stop)
    stopped_at = time.monotonic()
    await asyncio.sleep(down_s)
    await asyncio.to_thread(start)
    started_at = time.monotonic()
    await poll(lambda: asyncio.sleep(0, sum(a.status == 201 for a in traffic.since(started_at)) >= 10), 120,
               "appends to succeed again")
    return traffic.since(stopped_at)


async def _check_log(env: dict[str, str], traffic: Traffic, *, settle_s: float = 15) -> None:
    """Every append answered 2xx is in the log exactly once (one event, by id and hash, at one seq); nothing from a
    request answered otherwise is."""
    ok = {a.stream: a for a in traffic.answers if a.status is not None and 200 <= a.status < 300}
    other = {a.stream for a in traffic.answers if a.status is not None and not 200 <= a.status < 300}
    unanswered = {a.stream for a in traffic.answers if a.status is None}
    assert not unanswered, f"{len(unanswered)} requests had no answer"
    settings = settings_of(env)
    # A batch left staged is published by the sweeper within RUNLEDGER_PRODUCER_SWEEP_S: wait past it.
    await asyncio.sleep(settle_s)
    records = [orjson.loads(r.value) for r in await read_log(settings)]
    by_stream: dict[str, list[dict[str, object]]] = {}
    for e in records:
        by_stream.setdefault(str(e["subject"]), []).append(e)
    for stream, answer in ok.items():
        [event] = answer.body["events"]  # type: ignore[misc]
        found = by_stream.get(stream, [])
        # Exactly once: one event, at one seq. A batch both its request and the sweeper published (the request's
        # acknowledgement was late) is in the log twice as the same record, which readers keep once per seq.
        assert {(e["id"], e["hash"], e["seq"]) for e in found} == {(event["id"], event["hash"], event["seq"])}, (
            stream, found)
    assert sorted(other & set(by_stream)) == [], "appended, though answered otherwise"


def _refusals_are_503s(answers: list[Answer]) -> None:
    refused = [a for a in answers if a.status is None or not 200 <= a.status < 300]
    assert {a.status for a in refused} <= {503}, [(a.status, a.body) for a in refused][:5]
    assert all(a.retry_after and int(a.retry_after) >= 1 for a in refused)
    assert all(a.body.get("status") == 503 and "detail" in a.body for a in refused)


def _pid(env: dict[str, str], name: str) -> int:
    return int(json.loads((Path(env["RUNLEDGER_STATE_DIR"]) / "stack.json").read_text())[name]["pid"])


def _killer(env: dict[str, str], name: str, sig: signal.Signals) -> Callable[[], None]:
    def stop() -> None:
        pid = _pid(env, name)
        os.kill(pid, sig)
        psutil.Process(pid).wait(30)
    return stop


async def test_kafka_stopped_under_appends(own_broker_and_redis: dict[str, str]) -> None:
    env = await migrated({**own_broker_and_redis, "RUNLEDGER_PRODUCER_SWEEP_S": "0.5"})
    async with serving(env) as served:
        secret = _source(served)
        async with flowing(served, secret) as traffic:
            # The broker alone, killed (Tansu waits for its clients on SIGTERM): its log store keeps what it took.
            down = await _outage(traffic, _killer(env, "kafka", signal.SIGKILL),
                                        lambda: devstack.up(settings_of(env)))
        assert any(a.status == 503 for a in down), "no append was refused while Kafka was down"
        _refusals_are_503s(traffic.answers)
        await _check_log(env, traffic)


async def test_redis_stopped_under_appends(own_broker_and_redis: dict[str, str]) -> None:
    env = await migrated({**own_broker_and_redis, "RUNLEDGER_PRODUCER_SWEEP_S": "0.5"})
    async with serving(env) as served:
        secret = _source(served)
        async with flowing(served, secret) as traffic:
            down = await _outage(traffic, _killer(env, "redis", signal.SIGTERM),
                                        lambda: devstack.up(settings_of(env)))
        assert any(a.status == 503 for a in down), "no append was refused while Redis was down"
        _refusals_are_503s(traffic.answers)
        await _check_log(env, traffic)


async def test_postgres_stopped_under_appends_and_reads(own_broker_and_redis: dict[str, str],
                                                        stack_env: dict[str, str]) -> None:
    """Appends need Kafka and Redis only... but every request's signature is checked against the sources kept in
    PostgreSQL, so while it is down every request is a 503; reads too."""
    env = await migrated({**own_broker_and_redis, "RUNLEDGER_PRODUCER_SWEEP_S": "0.5"})
    session = settings_of(stack_env)
    async with serving(env) as served:
        secret = _source(served)
        try:
            async with flowing(served, secret) as traffic:
                down = await _outage(traffic, _killer(stack_env, "postgres", signal.SIGINT),
                                            lambda: devstack.up(session))
                async with httpx.AsyncClient(timeout=30) as client:
                    read = await client.get(f"{served.url}/v1/executions", headers=signed(secret, "fleet"))
                    assert read.status_code == 200, read.text
        finally:
            devstack.up(session)
        assert down, "no request while PostgreSQL was down"
        _refusals_are_503s(traffic.answers)
        await _check_log(env, traffic)


async def test_serve_starts_without_kafka_and_redis_and_appends_once_they_are_up(env: dict[str, str],
                                                                                 tmp_path: Path) -> None:
    kafka, redis = free_ports(2)
    env = await migrated({**env, "RUNLEDGER_STATE_DIR": str(tmp_path), "RUNLEDGER_EMBEDDED": "kafka,redis",
                          "RUNLEDGER_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}",
                          "RUNLEDGER_REDIS_URL": f"redis://127.0.0.1:{redis}/0", "RUNLEDGER_HTTP_START_RETRY_S": "0.5"})
    try:
        async with serving(env) as served, httpx.AsyncClient(timeout=30) as client:
            secret = _source(served)
            ready = await client.get(served.url + "/readyz")
            assert ready.status_code == 503 and ready.headers["retry-after"]
            assert {e["field"] for e in ready.json()["errors"]} == {"kafka", "redis"}
            body = orjson.dumps({"type": "execution.started", "data": {"workflow": "w"}})
            refused = await client.post(served.url + "/v1/streams/s-1/events", content=body,
                                        headers={"content-type": "application/json", **signed(secret, "fleet", body)})
            assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            await asyncio.to_thread(devstack.up, settings_of(env))

            async def ready_now() -> bool:
                return (await client.get(served.url + "/readyz")).status_code == 200

            await poll(ready_now, 60, "/readyz once Kafka and Redis are up")
            done = await client.post(served.url + "/v1/streams/s-1/events", content=body,
                                     headers={"content-type": "application/json", **signed(secret, "fleet", body)})
            assert done.status_code == 201, done.text
            assert served.process.poll() is None
        assert [orjson.loads(r.value)["subject"] for r in await read_log(settings_of(env))] == ["s-1"]
    finally:
        devstack.down(settings_of(env), purge=True)
