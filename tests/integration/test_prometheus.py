"""A real Prometheus (Debian's package) scrapes a real worker under load and a producer, with the alert rules
loaded: every PromQL expression of the dashboards and the rules is accepted by it and returns data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from runledger.schemas.checkpoint import Signer
from runledger.streams import metrics
from runledger.streams.dev.dashboards import build
from runledger.streams.dev.fleet import simulate_fleet
from runledger.streams.http.keys import init_key
from runledger.streams.producer.client import EventProducer
from runledger.streams.settings import Settings
from tests.conftest import CLI, free_ports
from tests.integration.conftest import FIRST_STREAM, poll, rechain, rehashed, running_worker, settings_of, terminate
from tests.integration.receivers import receiving_async

OPS = Path(__file__).resolve().parents[2] / "ops" / "prometheus"
RULES = yaml.safe_load((OPS / "alerts.yml").read_text())["groups"][0]["rules"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for model in build().values() for panel in model["panels"] for t in panel["targets"]
            if "expr" in t]


def _top_level(expr: str) -> Iterator[tuple[int, str]]:
    """(index, character) of ``expr`` outside brackets, braces, parentheses and strings."""
    depth, quote = 0, ""
    for i, c in enumerate(expr):
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            yield i, c


def comparisons(expr: str) -> list[str]:
    """The comparisons an alert's expression combines (with ``and``/``or``), each with the ``bool`` modifier: a
    0 or 1 for every series compared, so that they return data whether the alert fires or not. ``absent(X)``
    is looked at as X."""
    expr = " ".join(expr.split())
    cuts = [i for i, _ in _top_level(expr) if re.match(r" (and|or|unless) ", expr[i:])]
    parts = [expr[a:b].strip() for a, b in zip([0, *cuts], [*cuts, len(expr)], strict=True)]
    parts = [re.sub(r"^(and|or|unless) ", "", p) for p in parts]
    out = []
    for part in parts:
        if part.startswith("absent(") and part.endswith(")"):
            part = part[len("absent("):-1]
        [op] = [(i, m.group()) for i, _ in _top_level(part) if (m := re.match(r"==|!=|>=|<=|>|<", part[i:]))
                and part[i - 1] not in "=!<>"]
        at, symbol = op
        out.append(f"{part[:at]}{symbol} bool{part[at + len(symbol):]}")
    return out


def test_the_rules_comparisons_are_found() -> None:
    assert comparisons("sum(x) > 1000 and sum(deriv(x[10m])) > 0") == ["sum(x) > bool 1000",
                                                                        "sum(deriv(x[10m])) > bool 0"]
    assert comparisons('absent(up{job="w"} == 1)') == ['up{job="w"} == bool 1']
    assert comparisons("time() - max(t) > 120\n or sum(a) >= 0") == ["time() - max(t) > bool 120",
                                                                    "sum(a) >= bool 0"]
    assert sum(len(comparisons(r["expr"])) for r in RULES) == 20


class Prometheus:
    """Prometheus' HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> dict[str, Any]:
        address = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(address, timeout=10) as answer:
                body: dict[str, Any] = json.loads(answer.read())
        except urllib.error.HTTPError as e:  # a query it refuses: 400 with the reason
            body = json.loads(e.read())
        return body

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)


@contextlib.asynccontextmanager
async def prometheus(directory: Path, targets: dict[str, str]) -> AsyncIterator[Prometheus]:
    """Prometheus 2.42 scraping ``targets`` (job -> host:port) every second, with runledger's rules, evaluated
    every second. The workers' job is the one of ``ops/prometheus/prometheus.yml``, its targets static."""
    binary = shutil.which("prometheus")
    assert binary is not None, "prometheus is needed (Debian: apt-get install prometheus; `./dev test` does as root)"
    production = yaml.safe_load((OPS / "prometheus.yml").read_text())
    worker_job = production["scrape_configs"][0]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(OPS / production["rule_files"][0])],
              "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                 for job, target in targets.items()]}
    assert worker_job["job_name"] in targets
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    with (directory / "prometheus.log").open("wb") as log:
        server = subprocess.Popen([binary, f"--config.file={directory / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={directory / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    api = Prometheus(f"http://127.0.0.1:{port}")
    try:
        async def ready() -> bool:
            assert server.poll() is None, (directory / "prometheus.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{api.url}/-/ready", timeout=2) as answer:
                    return bool(answer.status == 200)
            return False

        await poll(ready, 60, "Prometheus to be ready")
        yield api
    finally:
        await terminate(server, 30)


@contextlib.asynccontextmanager
async def producer_metrics(port: int) -> AsyncIterator[None]:
    """This process's producer metrics, alone, on ``port`` (with the registry's worker metrics at 0, the
    dashboards' worker queries would be answered by a process that is no worker), and HTTP requests as a ``serve``
    counts them (``load`` counts some)."""
    registry = CollectorRegistry()
    for collector in (metrics.APPENDS, metrics.APPEND_SECONDS, metrics.LEASE_WAIT_SECONDS, metrics.HTTP_REQUESTS,
                      metrics.HTTP_SECONDS):
        registry.register(collector)
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


async def load(settings: Settings, stop: asyncio.Event) -> int:
    """Append simulated runs until ``stop``: the worker projects all along the scrapes."""
    appended, round_ = 0, 0
    async with EventProducer(settings) as producer:
        while not stop.is_set():
            round_ += 1
            for run in simulate_fleet(5, seed=round_, run_tag=f"{settings.db_schema}-{round_}"):
                await producer.append_batch(run.stream_id, run.events)
                appended += len(run.events)
                for status in ("201", "503"):  # as a serve counts its requests: the 5xx ratio has its series
                    metrics.HTTP_REQUESTS.labels("/v1/streams/{stream}/events", "POST", status).inc()
                metrics.HTTP_SECONDS.labels("/v1/streams/{stream}/events").observe(0.01)
            await asyncio.sleep(0.2)
    return appended


async def bad_records(settings: Settings) -> None:
    """A record that is not JSON, and a fork of a stream: a dead letter, and a chain violation too."""
    first, second = rechain(f"{settings.db_schema}-forked", FIRST_STREAM[:2])
    fork = rehashed(second, data={**second["data"], "name": "a fork"})
    async with EventProducer(settings) as producer:
        kafka = producer._kafka  # noqa: SLF001 - records the producer library would refuse to write
        await kafka.send_and_wait(settings.events_topic, b"not json", key=b"junk")
        for event in (first, second, fork):
            await kafka.send_and_wait(settings.events_topic, orjson.dumps(event), key=first["subject"].encode())


def returns_data(answer: dict[str, Any]) -> str | None:
    """Why a query's answer is not data (None if it is): refused, empty, or not a number."""
    if answer.get("status") != "success":
        return f"refused: {answer.get('error')}"
    result = answer["data"]["result"]
    if not result:
        return "no series"
    values = [float(r["value"][1]) for r in result] if answer["data"]["resultType"] == "vector" else [
        float(result[1])]
    return None if all(math.isfinite(v) for v in values) else f"values {values}"


@pytest.mark.slow
async def test_prometheus_scrapes_a_worker_under_load_and_every_query_returns_data(
        env: dict[str, str], tmp_path: Path) -> None:
    schema = f"p_{uuid.uuid4().hex[:12]}"
    key = tmp_path / "checkpoint.key"
    key.write_text(Signer.generate("runledger.local/log").private_key)
    key.chmod(0o600)  # a signer key others may read is refused
    worker_port, producer_port, hooks_port = free_ports(3)
    env = {**env, "RUNLEDGER_DB_SCHEMA": schema, "RUNLEDGER_CONSUMER_GROUP": f"g-{schema}",
           "RUNLEDGER_METRICS_PORT": str(worker_port), "RUNLEDGER_CHECKPOINT_KEY": str(key),
           "RUNLEDGER_CHECKPOINT_INTERVAL_S": "2", "RUNLEDGER_SOURCES_KEY_FILE": str(tmp_path / "sources.key"),
           "RUNLEDGER_WEBHOOK_ALLOW_PRIVATE": "true"}
    settings = settings_of(env)
    stop = asyncio.Event()
    appending: asyncio.Task[int] | None = None
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with producer_metrics(producer_port), running_worker(env) as worker, receiving_async() as receiver:
            # A delivery worker too, delivering the load to a receiver that refuses the forked stream for good (a
            # dead delivery: its alert's comparison has data).
            receiver.answer = lambda _, body: 400 if b"-forked" in body else 204
            init_key(settings)
            added = subprocess.run([*CLI, "webhooks", "add", receiver.url, "--json"], env={**os.environ, **env},
                                   capture_output=True, text=True, timeout=60, check=False)
            assert added.returncode == 0, added.stderr
            async with running_worker({**env, "RUNLEDGER_METRICS_PORT": str(hooks_port)},
                                      command=("webhooks", "worker")) as hooks, prometheus(tmp_path, {
                    "runledger-worker": f"127.0.0.1:{worker_port}", "runledger-producer": f"127.0.0.1:{producer_port}",
                    "runledger-webhooks": f"127.0.0.1:{hooks_port}"}) as api:
                async def scraped() -> bool:  # at 0: increase() sees the first dead letter only after a sample of 0
                    answers = [await asyncio.to_thread(api.query, expr) for expr in (
                        'runledger_dead_letters_total{reason="invalid_json"}',
                        'runledger_webhook_attempts_total{outcome="dead"}')]
                    return all(answer["data"]["result"] for answer in answers)
                await poll(scraped, 60, "Prometheus to scrape the workers")
                await bad_records(settings)
                appending = asyncio.create_task(load(settings, stop))

                async def verified() -> bool:
                    done = await asyncio.to_thread(subprocess.run, [*CLI, "verify", "chains"],
                                                   env={**os.environ, **env}, capture_output=True, text=True,
                                                   timeout=120)
                    return "checked" in done.stdout  # findings or not: the run is recorded, and that is what counts
                await poll(verified, 120, "a recorded verification (the worker makes the schema first)")

                queries = dashboard_exprs() + [c for rule in RULES for c in comparisons(rule["expr"])]
                missing: dict[str, str] = {}

                async def everything_answers() -> bool:
                    assert worker.poll() is None, "the worker stopped"
                    assert hooks.poll() is None, "the delivery worker stopped"
                    missing.clear()
                    for expr in queries:
                        if why := returns_data(await asyncio.to_thread(api.query, expr)):
                            missing[expr] = why
                    return not missing

                try:
                    await poll(everything_answers, 180,
                               "every dashboard query and every rule's comparison to return data")
                except AssertionError as e:
                    raise AssertionError(f"{e}; still without data: {missing}") from None
                for rule in RULES:  # the rules as written, thresholds and all, are accepted too
                    assert (await asyncio.to_thread(api.query, rule["expr"]))["status"] == "success", rule["alert"]

                async def rules_evaluated() -> list[dict[str, Any]] | None:
                    groups = (await asyncio.to_thread(api.get, "/api/v1/rules"))["data"]["groups"]
                    rules = [r for g in groups for r in g["rules"]]
                    return rules if rules and all(r["health"] == "ok" for r in rules) else None
                evaluated = await poll(rules_evaluated, 30, "Prometheus' rule manager to evaluate every rule")
                assert sorted(r["name"] for r in evaluated) == sorted(r["alert"] for r in RULES)
                targets = (await asyncio.to_thread(api.get, "/api/v1/targets"))["data"]["activeTargets"]
                assert {t["labels"]["job"]: t["health"] for t in targets} == {
                    "runledger-worker": "up", "runledger-producer": "up", "runledger-webhooks": "up"}
                expected = {"RunledgerDeadLettersGrowing", "RunledgerChainViolation", "RunledgerWebhookDeadGrowing"}

                async def firing() -> bool:  # each once its worker has come to the record that raises it
                    alerts = (await asyncio.to_thread(api.get, "/api/v1/alerts"))["data"]["alerts"]
                    return expected <= {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

                await poll(firing, 60, f"the alerts {sorted(expected)} to fire")
                stop.set()
                assert await appending > 0
    finally:
        stop.set()
        if appending is not None:
            await asyncio.gather(appending, return_exceptions=True)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
