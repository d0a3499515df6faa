"""``POST /v1/events``, the CloudEvents HTTP binding, on the embedded stack: structured, batched and binary mode;
events chained by the server, or by their producer and published as they are when they link."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from runledger.schemas.chain import GENESIS_HASH, compute_hash
from tests.integration.httpapi.conftest import Ingest

SOURCE = "/producers/billing"
STRUCTURED = {"content-type": "application/cloudevents+json"}
BATCHED = {"content-type": "application/cloudevents-batch+json"}


def cloudevent(stream: str, type_: str, data: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": SOURCE, "type": type_, "subject": stream,
            "data": data, **more}


def started(stream: str, **more: Any) -> dict[str, Any]:
    return cloudevent(stream, "execution.started", {"workflow": "w"}, **more)


def step(stream: str, i: int, **more: Any) -> dict[str, Any]:
    return cloudevent(stream, "step.started", {"step_id": f"s{i}", "name": "n"}, **more)


def chained(events: list[dict[str, Any]], seq: int = 0, prevhash: str = GENESIS_HASH) -> list[dict[str, Any]]:
    """``events`` chained by their producer after (``seq``, ``prevhash``), as a client that hashes does."""
    out = []
    for event in events:
        seq += 1
        event = {**event, "time": "2026-11-22T10:00:00.125Z", "datacontenttype": "application/json", "seq": seq,
                 "prevhash": prevhash}
        event["hash"] = prevhash = compute_hash(event)
        out.append(event)
    return out


async def test_structured_mode_appends_one_event_with_its_id(ingest: Ingest) -> None:
    event = started("bill-1")
    answer = await ingest.post("/v1/events", event, headers=STRUCTURED)
    assert answer.status_code == 201, answer.text
    [logged] = await ingest.log()
    assert (logged["id"], logged["source"], logged["subject"], logged["seq"]) == (event["id"], SOURCE, "bill-1", 1)
    assert answer.json()["events"][0]["hash"] == logged["hash"]
    again = await ingest.post("/v1/events", event, headers=STRUCTURED)  # the same id: the same event
    assert again.status_code == 200 and again.json()["events"][0]["duplicate"] is True
    assert len(await ingest.log()) == 1


async def test_batched_mode_appends_all_of_one_stream(ingest: Ingest) -> None:
    answer = await ingest.post("/v1/events", [started("bill-1"), step("bill-1", 1), step("bill-1", 2)],
                               headers=BATCHED)
    assert answer.status_code == 201, answer.text
    assert [e["seq"] for e in await ingest.log()] == [1, 2, 3]


async def test_binary_mode_maps_the_ce_headers(ingest: Ingest) -> None:
    event_id = str(uuid.uuid4())
    answer = await ingest.post("/v1/events", {"workflow": "w"}, headers={
        "ce-specversion": "1.0", "ce-id": event_id, "ce-source": "%2Fproducers%2Fbilling",
        "ce-type": "execution.started", "ce-subject": "bill-1", "ce-time": "2026-11-22T10:00:00Z",
        "content-type": "application/json; charset=utf-8"})
    assert answer.status_code == 201, answer.text
    [logged] = await ingest.log()
    assert (logged["id"], logged["source"], logged["time"]) == (event_id, SOURCE, "2026-11-22T10:00:00.000Z")


async def test_binary_mode_publishes_a_chained_event(ingest: Ingest) -> None:
    [event] = chained([started("bill-1")])
    headers = {f"ce-{k}": str(v) for k, v in event.items() if k not in ("data", "datacontenttype")}
    answer = await ingest.post("/v1/events", event["data"], headers=headers)
    assert answer.status_code == 201, answer.text
    assert [e["hash"] for e in await ingest.log()] == [event["hash"]]


async def test_chained_events_are_published_as_they_are_when_they_link(ingest: Ingest) -> None:
    first = chained([started("bill-1"), step("bill-1", 1)])
    answer = await ingest.post("/v1/events", first, headers=BATCHED)
    assert answer.status_code == 201, answer.text
    assert [(e["seq"], e["hash"]) for e in answer.json()["events"]] == [(e["seq"], e["hash"]) for e in first]
    assert [orjson.dumps(e) for e in await ingest.log()] == [orjson.dumps(e) for e in first]
    stale = chained([step("bill-1", 2)], 1, first[0]["hash"])  # chained on seq 1: another appended seq 2 since
    refused = await ingest.post("/v1/events", stale, headers=BATCHED)
    assert refused.status_code == 409
    assert {k: refused.json()[k] for k in ("code", "seq", "hash")} == {
        "code": "chain_conflict", "seq": 2, "hash": first[1]["hash"]}
    forged = chained([step("bill-1", 2)], 2, first[1]["hash"])
    forged[0]["data"] = {"step_id": "other", "name": "n"}  # its hash no longer verifies
    tampered = await ingest.post("/v1/events", forged, headers=BATCHED)
    assert tampered.status_code == 422 and tampered.json()["errors"][0]["field"] == "hash"
    assert len(await ingest.log()) == 2
    linked = chained([step("bill-1", 2)], 2, first[1]["hash"])
    assert (await ingest.post("/v1/events", linked, headers=BATCHED)).status_code == 201
    replayed = await ingest.post("/v1/events", linked, headers=BATCHED)
    assert replayed.status_code == 200
    assert [e["seq"] for e in await ingest.log()] == [1, 2, 3]


async def test_refusals_append_nothing(ingest: Ingest) -> None:
    cases = [
        (started("bill-1", source="/producers/someone-else"), STRUCTURED, 403, "wrong_source"),
        (started("ops-1"), STRUCTURED, 403, "outside_grant"),
        ([started("bill-1"), started("bill-2")], BATCHED, 422, "invalid_event"),
        ([started("bill-1"), *chained([step("bill-1", 1)], 1, GENESIS_HASH)], BATCHED, 422, "invalid_event"),
        ({**started("bill-1"), "id": "not-a-uuid", "colour": "red"}, STRUCTURED, 422, "invalid_event"),
        (started("bill-1"), {"content-type": "text/plain"}, 415, "unsupported_media_type"),
        ({"workflow": "w"}, {"ce-specversion": "1.0", "ce-type": "execution.started", "ce-subject": "bill-1",
                             "content-type": "text/plain"}, 415, "unsupported_media_type"),
        (started("bill-1"), {**STRUCTURED, "webhook-id": "x"}, None, None),  # the control: the same, accepted
    ]
    for body, headers, status, code in cases[:-1]:
        answer = await ingest.post("/v1/events", body, headers=headers)
        assert (answer.status_code, answer.json()["code"]) == (status, code), answer.text
        assert answer.headers["content-type"] == "application/problem+json"
    assert await ingest.log() == []
    body, headers, _, _ = cases[-1]
    assert (await ingest.post("/v1/events", body, headers=headers)).status_code == 201


async def test_every_invalid_field_is_named_with_its_index(ingest: Ingest) -> None:
    answer = await ingest.post("/v1/events", [started("bill-1"), {**step("bill-1", 1), "id": "x"},
                                              cloudevent("bill-1", "step.started", {"name": "n"})], headers=BATCHED)
    assert answer.status_code == 422
    assert [(e["field"], e["index"]) for e in answer.json()["errors"]] == [("id", 1), ("data.step_id", 2)]
