"""``POST /v1/streams/{stream}/events`` on the embedded stack: appended all or nothing with the caller's source,
every refusal a problem document with nothing appended, retries answered from the first append."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY

from runledger.streams.http.caller import Caller
from tests.integration.conftest import running_worker
from tests.integration.httpapi.conftest import PRODUCER, Ingest

STARTED = {"type": "execution.started", "data": {"workflow": "w"}}


def step(i: int) -> dict[str, Any]:
    return {"type": "step.started", "data": {"step_id": f"s{i}", "name": "n"}}


def appended(mode: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("runledger_http_append_requests_total", {"mode": mode, "outcome": outcome}) or 0


async def test_events_land_with_the_callers_source_and_are_projected(ingest: Ingest) -> None:
    before = appended("simple", "appended")
    async with running_worker(ingest.env):
        answer = await ingest.post("/v1/streams/bill-1/events", [STARTED, step(1), step(2)], wait="projected",
                                   timeout=60)
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["projected"] is True and body["wait"]["status"] == "projected"
    log = await ingest.log()
    assert [(e["seq"], e["id"], e["hash"]) for e in log] == [(a["seq"], a["id"], a["hash"]) for a in body["events"]]
    assert {e["source"] for e in log} == {"/producers/billing"}
    assert appended("simple", "appended") == before + 1


async def test_one_object_is_one_event(ingest: Ingest) -> None:
    answer = await ingest.post("/v1/streams/bill-1/events", STARTED)
    assert answer.status_code == 201, answer.text
    assert [e["seq"] for e in answer.json()["events"]] == [1]
    assert "projected" not in answer.json()


async def test_a_batch_of_1000_is_appended_and_1001_is_refused(ingest: Ingest) -> None:
    answer = await ingest.post("/v1/streams/bill-1/events", [STARTED, *(step(i) for i in range(999))])
    assert answer.status_code == 201, answer.text
    assert [e["seq"] for e in answer.json()["events"]] == list(range(1, 1001))
    refused = await ingest.post("/v1/streams/bill-2/events", [STARTED, *(step(i) for i in range(1000))])
    assert refused.status_code == 413
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["code"] == "batch_too_large"
    assert len(await ingest.log()) == 1000


@pytest.mark.parametrize(("body", "content_type", "status", "code", "errors"), [
    (b'[{"type": "execution.started",', "application/json", 400, "invalid_json", [{"field": ""}]),
    ([STARTED, {"type": "step.started", "data": {"name": "n"}}, {"type": "agent.exploded", "data": {}},
      {"type": "step.started", "data": {}, "colour": "red"}], "application/json", 422, "invalid_event",
     [{"field": "data.step_id", "index": 1}, {"field": "type", "index": 2}, {"field": "colour", "index": 3}]),
    ([STARTED, {"type": "step.started", "data": {"step_id": "s", "name": "n" * 600_000}}], "application/json",
     413, "too_large", [{"field": "data", "index": 1}]),
    ([STARTED, {**step(1), "idempotency_key": "k"}, {**step(2), "idempotency_key": "k"}], "application/json", 422,
     "invalid_event", [{"field": "idempotency_key", "index": 2}]),
    ([{**STARTED, "time": "yesterday"}], "application/json", 422, "invalid_event", [{"field": "time", "index": 0}]),
    (b'{"type": "execution.started", "data": {"workflow": "a", "workflow": "b"}}', "application/json", 422,
     "invalid_event", [{"field": "data.workflow"}]),
    ([step(1)], "application/json", 409, "illegal_transition", None),
    ([STARTED], "text/plain", 415, "unsupported_media_type", None),
    ([], "application/json", 422, "invalid_event", None),
], ids=["bad-json", "invalid-fields", "too-large", "repeated-key", "bad-time", "duplicate-member", "lifecycle",
        "media-type", "empty"])
async def test_every_refusal_is_a_problem_and_appends_nothing(ingest: Ingest, body: Any, content_type: str,
                                                             status: int, code: str, errors: Any) -> None:
    before = appended("simple", "refused")
    answer = await ingest.post("/v1/streams/bill-1/events", body, headers={"content-type": content_type},
                               content=body if isinstance(body, bytes) else None)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert (problem["status"], problem["code"]) == (status, code)
    assert problem["type"].endswith("/" + code) and problem["detail"]
    if errors is not None:
        assert [{k: e.get(k) for k in want} for e, want in zip(problem["errors"], errors, strict=True)] == errors
        assert all(e["reason"] for e in problem["errors"])
    assert await ingest.log() == []
    assert appended("simple", "refused") == before + 1


async def test_the_bad_json_problem_names_the_position(ingest: Ingest) -> None:
    answer = await ingest.post("/v1/streams/bill-1/events", content=b'{"type": }')
    assert answer.status_code == 400
    assert "line 1 column 10" in answer.json()["detail"]


async def test_a_source_cannot_append_outside_its_prefix(ingest: Ingest) -> None:
    answer = await ingest.post("/v1/streams/ops-1/events", STARTED)
    assert answer.status_code == 403
    assert answer.json()["code"] == "outside_grant"
    assert await ingest.log() == []


async def test_a_replayed_webhook_id_appends_nothing_and_answers_the_same(ingest: Ingest) -> None:
    first = await ingest.post("/v1/streams/bill-1/events", [STARTED, step(1)], webhook_id="msg_1")
    again = await ingest.post("/v1/streams/bill-1/events", [STARTED, step(1)], webhook_id="msg_1")
    assert (first.status_code, again.status_code) == (201, 200)
    strip = [{k: v for k, v in e.items() if k != "duplicate"} for e in first.json()["events"]]
    assert [{k: v for k, v in e.items() if k != "duplicate"} for e in again.json()["events"]] == strip
    assert all(e["duplicate"] for e in again.json()["events"])
    other = await ingest.post("/v1/streams/bill-1/events", [step(2)], webhook_id="msg_2")
    assert other.status_code == 201 and other.json()["events"][0]["seq"] == 3
    assert len(await ingest.log()) == 3


async def test_one_sources_idempotency_keys_are_not_anothers(ingest: Ingest) -> None:
    mine = await ingest.post("/v1/streams/bill-1/events", [{**STARTED, "idempotency_key": "k"}])
    again = await ingest.post("/v1/streams/bill-1/events", [{**step(1), "idempotency_key": "k"}])
    assert again.status_code == 200 and again.json()["events"] == [{**mine.json()["events"][0], "duplicate": True}]
    ingest.who[0] = Caller("other", "/producers/other", append_prefixes=("bill-",))
    theirs = await ingest.post("/v1/streams/bill-1/events", [{**step(1), "idempotency_key": "k"}])
    assert theirs.status_code == 201 and theirs.json()["events"][0]["seq"] == 2
    assert [e["source"] for e in await ingest.log()] == ["/producers/billing", "/producers/other"]


async def test_expected_seq_conflict_is_409_with_the_streams_seq(ingest: Ingest) -> None:
    assert (await ingest.post("/v1/streams/bill-1/events", STARTED, expected_seq=0)).status_code == 201
    answer = await ingest.post("/v1/streams/bill-1/events", step(1), expected_seq=0)
    assert answer.status_code == 409
    assert {k: answer.json()[k] for k in ("code", "expected_seq", "seq")} == {
        "code": "append_conflict", "expected_seq": 0, "seq": 1}
    assert (await ingest.post("/v1/streams/bill-1/events", step(1), expected_seq=1)).status_code == 201
    assert [e["seq"] for e in await ingest.log()] == [1, 2]


async def test_a_wait_that_times_out_still_answers_201(ingest: Ingest) -> None:
    answer = await ingest.post("/v1/streams/bill-1/events", STARTED, wait="projected", timeout=0.5)
    assert answer.status_code == 201
    assert answer.json()["projected"] is False and answer.json()["wait"]["status"] == "timeout"
    assert len(await ingest.log()) == 1


async def test_a_busy_stream_is_503_with_retry_after_and_appends_nothing(ingest: Ingest) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(ingest.settings.redis_dsn)
    try:
        await redis.set(f"{ingest.settings.topic_prefix}:lease:bill-1", "someone else", px=60_000)
        answer = await ingest.post("/v1/streams/bill-1/events", STARTED)
    finally:
        await redis.aclose()
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["code"] == "stream_busy"
    assert await ingest.log() == []
    assert PRODUCER.source_id == "billing"
