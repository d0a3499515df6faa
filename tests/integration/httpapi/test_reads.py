"""The read API (streams/http/reads.py) on the embedded stack: executions listed with each filter and walked page by
page inside the caller's read scope, one execution as projected, its events byte for byte as the log holds them,
inclusion proofs the project's own verifier accepts and the newest checkpoints the signer's key verifies."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import Response

from runledger.projections.postgres.db import connect
from runledger.projections.postgres.queries import query
from runledger.schemas.checkpoint import Verifier
from runledger.schemas.proofs import check_proof
from runledger.streams.http import documents, reads
from runledger.streams.http.auth import caller
from runledger.streams.http.caller import Caller
from runledger.streams.http.problems import Problem, problem_response
from runledger.streams.http.reads import encode_cursor
from runledger.streams.http.services import Services
from runledger.streams.settings import Settings
from runledger.streams.tools.checkpoints import create_signer_key, prove_inclusion, sign_round
from tests.integration.conftest import FIRST_STREAM, KafkaLedger, kafka_ledger, read_log, rechain

BASE = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Run:
    stream: str
    workflow: str
    customer: str
    started: datetime
    completed: bool


# acme:* and other:* streams; two start at the same instant (the order falls back on the stream id).
RUNS = [Run(f"{'acme' if i % 3 else 'other'}:run-{i:02d}", ("triage", "refund")[i % 2], f"cust-{i % 4}",
            BASE + timedelta(minutes=i if i != 7 else 6), i % 5 != 0) for i in range(1, 17)]


def stream_events(run: Run) -> list[dict[str, Any]]:
    events = []
    for n, event in enumerate(FIRST_STREAM if run.completed else FIRST_STREAM[:-1]):
        event = {**event, "time": (run.started + timedelta(seconds=n)).isoformat().replace("+00:00", "Z")}
        if event["type"] == "execution.started":
            event["data"] = {**event["data"], "workflow": run.workflow, "customer_id": run.customer}
        if event["type"] == "cost.incurred" and "cost_usd" in event["data"]:  # written 1.0E-7 by str(Decimal)
            event["data"] = {**event["data"], "cost_usd": "0.00000010"}
        events.append(event)
    return rechain(run.stream, events)


async def append_spaced(settings: Settings, events: list[dict[str, Any]]) -> None:
    """Produce ``events`` keyed by stream, each as JSON with spaces after its separators and its numbers as written
    in text: valid, hashed the same, and not what a parser would write again (the bytes must come back as they
    were)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for event in events:
            value = json.dumps(event, separators=(", ", ": ")).replace('"score": 0.93', '"score": 0.930')
            await producer.send_and_wait(settings.events_topic, value.encode(), key=event["subject"].encode())
    finally:
        await producer.stop()


@dataclass
class Api:
    ledger: KafkaLedger
    client: httpx.AsyncClient
    app: FastAPI
    events: dict[str, list[dict[str, Any]]]
    who: list[Caller] = field(default_factory=list)

    def as_caller(self, *read_prefixes: str) -> None:
        self.who[:] = [Caller("s1", "https://test/s1", (), read_prefixes)]

    async def get(self, url: str, **params: Any) -> httpx.Response:
        return await self.client.get(url, params={k: v for k, v in params.items() if v is not None})


async def invalid_request(request: Request, exc: Exception) -> Response:
    """As the app's own handler (streams/http/app.py) answers a request FastAPI found invalid: a 422 problem."""
    assert isinstance(exc, RequestValidationError)
    errors = [{"field": ".".join(str(p) for p in e["loc"][1:]), "reason": e["msg"]} for e in exc.errors()]
    return await problem_response(request, Problem(422, "invalid_request", "the request is invalid", errors=errors))


def api_app(services: Services, who: list[Caller]) -> FastAPI:
    app = FastAPI()
    app.include_router(reads.router)
    app.add_exception_handler(Problem, problem_response)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.state.services = services
    app.dependency_overrides[caller] = lambda: who[0]
    return app


@pytest.fixture
async def api(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    async with kafka_ledger(env, tmp_path / "keys", monkeypatch) as ledger:
        events = {run.stream: stream_events(run) for run in RUNS}
        await append_spaced(ledger.settings, [e for stream in events.values() for e in stream])
        await ledger.project()
        settings = ledger.settings
        pool = await connect(settings.database_dsn(), settings.db_schema,
                             session={"plan_cache_mode": "force_custom_plan"})
        who = [Caller("s1", "https://test/s1", (), ("",))]
        app = api_app(Services(settings, cast(Any, None), pool, cast(Any, None)), who)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api") as client:
                yield Api(ledger, client, app, events, who)
        finally:
            await pool.close()


async def walk(api: Api, limit: int, **filters: Any) -> list[str]:
    """Every page of the list, following next; each page but the last is full."""
    seen: list[str] = []
    cursor = None
    while True:
        response = await api.get("/v1/executions", limit=limit, cursor=cursor, **filters)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [e["stream_id"] for e in page["executions"]]
        cursor = page["next"]
        if cursor is None:
            return seen
        assert len(page["executions"]) == limit, "a page before the last is short: filtered after it was cut"


def expected(prefix: str = "", **match: Any) -> list[str]:
    runs = [r for r in RUNS if r.stream.startswith(prefix) and all(
        (getattr(r, k) == v) if k != "status" else (("completed" if r.completed else "running") == v)
        for k, v in match.items() if k not in ("started_from", "started_to"))
        and r.started >= match.get("started_from", BASE) and r.started < match.get("started_to", BASE + timedelta(1))]
    return [r.stream for r in sorted(runs, key=lambda r: (r.started, r.stream), reverse=True)]


async def test_the_list_filters_and_pages_inside_the_read_scope(api: Api) -> None:
    assert await walk(api, 500) == expected()
    for limit in (1, 3, 5):  # every page, no duplicate, no gap, in order
        assert await walk(api, limit) == expected()
    assert await walk(api, 2, status="running") == expected(status="running")
    assert await walk(api, 2, workflow="refund") == expected(workflow="refund")
    assert await walk(api, 2, customer="cust-1") == expected(customer="cust-1")
    since, until = BASE + timedelta(minutes=4), BASE + timedelta(minutes=11)
    assert await walk(api, 2, started_from=since.isoformat(), started_to=until.isoformat().replace("+00:00", "Z")) \
        == expected(started_from=since, started_to=until)
    assert await walk(api, 2, status="completed", workflow="triage", customer="cust-3") == \
        expected(status="completed", workflow="triage", customer="cust-3")

    api.as_caller("acme:")  # the scope in SQL: pages stay full
    assert await walk(api, 3) == expected("acme:") and len(expected("acme:")) > 3
    assert await walk(api, 2, workflow="triage") == expected("acme:", workflow="triage")
    api.as_caller("ac_e:", "oth%")  # LIKE's wildcards are letters here
    assert await walk(api, 2) == []
    api.as_caller()
    assert await walk(api, 2) == []

    api.as_caller("")
    page = (await api.get("/v1/executions", limit=1)).json()["executions"][0]
    run = next(r for r in RUNS if r.stream == page["stream_id"])
    assert page["started_at"] == run.started.isoformat().replace("+00:00", "Z")
    cost = await api.ledger.conn.fetchval("SELECT cost_usd FROM executions WHERE stream_id = $1", run.stream)
    assert page["cost_usd"] == format(cost, "f") and cost > 0

    for params, status, field_name in (({"cursor": "bm90IGEgY3Vyc29y"}, 400, "cursor"), ({"limit": 501}, 422, "limit"),
                                       ({"started_from": "2026-11-22T10:00:00"}, 422, "started_from"),
                                       ({"status": "lost"}, 422, "status"),
                                       ({"started_to": "0001-01-01T00:00:00+14:00"}, 422, "started_to"),
                                       ({"workflow": "a\x00b"}, 422, "workflow"),
                                       ({"cursor": encode_cursor(BASE, "x\x00y")}, 400, "cursor"),
                                       ({"cursor": base64.urlsafe_b64encode(b'["0001-01-01T00:00:00+14:00","a"]')
                                         .decode()}, 400, "cursor")):
        refused = await api.client.get("/v1/executions", params=params)
        assert refused.status_code == status and refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["errors"][0]["field"] == field_name


async def test_one_execution_is_the_projection_and_the_scope_is_kept(api: Api) -> None:
    db = api.ledger.conn
    for run in RUNS[:4]:
        response = await api.get(f"/v1/executions/{run.stream}")
        assert response.status_code == 200, response.text
        got = response.json()
        row = await db.fetchrow("SELECT * FROM executions WHERE stream_id = $1", run.stream)
        totals = got["totals"]
        assert (totals["cost_usd"], totals["budget_usd"]) == (format(row["cost_usd"], "f"),
                                                              format(row["budget_usd"], "f"))
        assert isinstance(totals["cost_usd"], str) and Decimal(totals["cost_usd"]) == row["cost_usd"]
        assert (totals["input_tokens"], totals["output_tokens"], totals["unpriced_costs"]) == \
            (row["input_tokens"], row["output_tokens"], row["unpriced_costs"])
        assert totals["steps"] == {k: row[f"steps_{k}"] for k in ("total", "running", "retrying", "completed",
                                                                    "failed", "skipped")}
        assert got["status"] == row["status"] == ("completed" if run.completed else "running")
        assert (got["last_seq"], got["last_hash"]) == (row["last_seq"], row["last_hash"])
        costs = await db.fetch("SELECT event_id::text, cost_usd FROM costs WHERE stream_id = $1 ORDER BY seq",
                               run.stream)
        assert [(c["event_id"], c["cost_usd"]) for c in got["costs"]] == \
            [(c["event_id"], None if c["cost_usd"] is None else format(c["cost_usd"], "f")) for c in costs]
        assert sum(Decimal(c["cost_usd"]) for c in got["costs"] if c["cost_usd"]) == Decimal(totals["cost_usd"])
        assert [s["step_id"] for s in got["steps"]] == ["s1", "s2"]
        assert [a["artifact_id"] for a in got["artifacts"]] == ["art-1"]
        assert got["started_at"] == run.started.isoformat().replace("+00:00", "Z")

    api.as_caller("acme:")
    assert (await api.get("/v1/executions/acme:run-01")).status_code == 200
    for stream in ("other:run-03", "other:nothing-here"):  # answered from the id: existence is not told
        refused = await api.get(f"/v1/executions/{stream}")
        assert refused.status_code == 403 and refused.json()["code"] == "outside_read_scope"
        assert (await api.get(f"/v1/executions/{stream}/events")).status_code == 403
    missing = await api.get("/v1/executions/acme:nothing-here")
    assert missing.status_code == 404 and missing.json()["code"] == "execution_not_found"
    assert (await api.get("/v1/executions/acme:nothing-here/events")).status_code == 404
    assert (await api.get("/v1/executions/bad id!")).status_code == 422


async def test_events_are_the_log_records_byte_for_byte(api: Api) -> None:
    log = await read_log(api.ledger.settings)
    for run in RUNS[:3]:
        records = [r.value for r in log if r.key == run.stream.encode()]
        assert len(records) == len(api.events[run.stream])
        whole = await api.get(f"/v1/executions/{run.stream}/events")
        assert whole.status_code == 200
        assert whole.headers["content-type"] == "application/cloudevents-batch+json"
        assert whole.content == b"[" + b",".join(cast(list[bytes], records)) + b"]"
        assert b'"score": 0.930' in whole.content and b'{"specversion": ' in whole.content
        assert "link" not in whole.headers
        pages, url = [], f"/v1/executions/{run.stream}/events?limit=4"
        while url:
            page = await api.client.get(url)
            assert page.status_code == 200
            pages.append(page.content)
            url = page.links.get("next", {}).get("url")
        assert len(pages) == -(-len(records) // 4)
        assert pages == [b"[" + b",".join(cast(list[bytes], records[i:i + 4])) + b"]"
                         for i in range(0, len(records), 4)]
        after = await api.get(f"/v1/executions/{run.stream}/events", after_seq=len(records))
        assert after.content == b"[]"


async def test_proofs_and_checkpoints_verify_with_the_signers_key(api: Api) -> None:
    settings = api.ledger.settings
    event_id = api.events["acme:run-01"][3]["id"]
    not_yet = await api.get(f"/v1/events/{event_id}/proof")
    assert not_yet.status_code == 409 and not_yet.json()["code"] == "proof_not_ready"
    assert int(not_yet.headers["retry-after"]) >= 1
    assert (await api.get("/v1/checkpoints/latest")).json()["checkpoints"] == []

    signer = create_signer_key(settings)
    signed = await sign_round(settings, signer)
    assert signed.signed and not signed.refused
    response = await api.get(f"/v1/events/{event_id}/proof")
    assert response.status_code == 200, response.text
    document = response.json()
    proven = check_proof(document, signer.verifier_key)
    assert proven.event_id == event_id
    assert document == await prove_inclusion(settings, event_id)  # what `runledger prove` writes
    assert orjson.loads(base64.b64decode(document["event"]))["id"] == event_id

    api.as_caller("other:")
    assert (await api.get(f"/v1/events/{event_id}/proof")).status_code == 404  # as one that does not exist
    api.as_caller("acme:")
    missing = await api.get("/v1/events/00000000-0000-4000-8000-000000000000/proof")
    assert missing.status_code == 404 and missing.json()["code"] == "event_not_found"
    assert (await api.get("/v1/events/not-a-uuid/proof")).status_code == 422

    latest = (await api.get("/v1/checkpoints/latest")).json()
    assert latest["topic"] == settings.events_topic
    verifier = Verifier(signer.verifier_key)
    by_partition = {s.partition: s for s in signed.signed}
    assert sorted(c["partition"] for c in latest["checkpoints"]) == sorted(by_partition)
    for c in latest["checkpoints"]:
        checkpoint = verifier.open(c["note"], origin=f"{settings.checkpoint_origin}/{settings.events_topic}/"
                                                     f"{c['partition']}")
        assert (c["size"], c["root"]) == (checkpoint.size, checkpoint.root.hex())
        assert c["note"] == by_partition[c["partition"]].note

    more = rechain("acme:late")  # a later round: the newest is served
    await api.ledger.append(more)
    await api.ledger.project()
    late = await api.get(f"/v1/events/{more[0]['id']}/proof")
    assert late.status_code == 409
    again = await sign_round(settings, signer)
    newest = {c["partition"]: c for c in (await api.get("/v1/checkpoints/latest")).json()["checkpoints"]}
    for s in again.signed:
        assert newest[s.partition]["note"] == s.note
    assert check_proof((await api.get(f"/v1/events/{more[0]['id']}/proof")).json(), signer.verifier_key)


async def test_the_list_query_reads_its_index_in_order(api: Api) -> None:
    """With a custom plan per call (the api login's plan_cache_mode), each filter's page is read from its index in
    order: no Sort, no scan of the table."""
    conn = api.ledger.conn
    await conn.execute("SET plan_cache_mode = force_custom_plan; SET enable_seqscan = off; SET enable_bitmapscan = off")
    for filters, index in ((("completed", None, None), "executions_status_started"),
                           ((None, "triage", None), "executions_workflow_started"),
                           ((None, None, "cust-1"), "executions_customer_started"),
                           ((None, None, None), "executions_started")):
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + query("read_executions"), ["acme:"], *filters,
                                   BASE, None, BASE + timedelta(hours=1), "acme:run-09", 101)
        text = orjson.dumps(plan if not isinstance(plan, str) else orjson.loads(plan)).decode()
        assert index in text and '"Sort"' not in text and "Seq Scan" not in text, text


async def test_postgresql_unavailable_is_a_503_with_retry_after(api: Api) -> None:
    settings = api.ledger.settings
    dead = await connect(settings.database_dsn().replace(settings.database_url.split("@")[1].split("/")[0],
                                                         "127.0.0.1:9"), settings.db_schema)
    app = api_app(Services(settings, cast(Any, None), dead, cast(Any, None)), api.who)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api") as client:
            for url in ("/v1/executions", "/v1/executions/acme:run-01", "/v1/executions/acme:run-01/events",
                        f"/v1/events/{api.events['acme:run-01'][0]['id']}/proof", "/v1/checkpoints/latest"):
                response = await client.get(url)
                assert response.status_code == 503, (url, response.text)
                assert response.headers["retry-after"] == "5"
                assert response.json()["code"] == "database_unavailable"
    finally:
        await dead.close()


def test_the_openapi_document_names_every_answer() -> None:
    app = api_app(cast(Any, None), [])
    document = app.openapi()
    for path, statuses in (("/v1/executions", {"200", "400", "401", "422", "503"}),
                           ("/v1/executions/{stream}", {"200", "401", "403", "404", "422", "503"}),
                           ("/v1/executions/{stream}/events", {"200", "401", "403", "404", "422", "503"}),
                           ("/v1/events/{id}/proof", {"200", "401", "404", "409", "422", "503"}),
                           ("/v1/checkpoints/latest", {"200", "401", "422", "503"})):
        responses = document["paths"][path]["get"]["responses"]
        assert set(responses) == statuses, path
        for status, answer in responses.items():
            if status != "200":
                assert list(answer["content"]) == ["application/problem+json"], (path, status)
    events = document["paths"]["/v1/executions/{stream}/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["application/cloudevents-batch+json"]
    money = document["components"]["schemas"]["Totals"]["properties"]["cost_usd"]
    assert money["type"] == "string" and money["pattern"] == documents.MONEY_PATTERN
