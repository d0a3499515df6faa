"""Every refusal of the append routes, end to end: signed requests to a real ``runledger serve``, each answered with
its status and an RFC 9457 problem document naming what failed, and nothing appended by a refused request (the log
is read after each one)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from runledger.schemas.chain import GENESIS_HASH, compute_hash
from runledger.streams.http.problems import PROBLEM_TYPE
from tests.integration.conftest import poll
from tests.integration.httpapi.serving import Served, add_source, logged, migrated, post_signed, serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STRUCTURED = {"content-type": "application/cloudevents+json"}
MAX_BODY = 1024 * 1024


def problem(answer: httpx.Response, status: int, code: str, fields: list[tuple[int | None, str]] | None = None
            ) -> dict[str, Any]:
    """The problem document of ``answer``, checked: its status, media type, members and (if given) exactly the
    ``(index, field)`` of each error, in order."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json", answer.headers
    doc: dict[str, Any] = answer.json()
    assert doc["type"] == PROBLEM_TYPE + code and doc["code"] == code, doc
    assert doc["status"] == status and isinstance(doc["title"], str) and doc["title"], doc
    assert isinstance(doc["detail"], str) and doc["detail"], doc
    assert doc["instance"] == answer.request.url.path, doc
    if fields is not None:
        assert [(e.get("index"), e["field"]) for e in doc["errors"]] == fields, doc["errors"]
        assert all(isinstance(e["reason"], str) and e["reason"] for e in doc["errors"]), doc["errors"]
    return doc


def started(workflow: str = "triage") -> dict[str, Any]:
    return {"type": "execution.started", "data": {"workflow": workflow}}


def cloudevent(stream: str, source: str, **more: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": source, "type": "step.started",
            "subject": stream, "data": {"step_id": "s1", "name": "n"}, **more}


class Client:
    """Signed requests of one source to ``served``, and the log they must leave as it was when refused."""

    def __init__(self, http: httpx.AsyncClient, served: Served, source_id: str, secret: str) -> None:
        self.http, self.served, self.source_id, self.secret = http, served, source_id, secret
        self.headers = httpx.Headers()  # the last refusal's

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None, *, raw: bytes | None = None,
                   msg_id: str | None = None, at: datetime | None = None, secret: str | None = None
                   ) -> httpx.Response:
        content = raw if raw is not None else orjson.dumps(body)
        return await post_signed(self.http, self.served, path, secret or self.secret, self.source_id, content,
                                 headers, msg_id=msg_id, at=at)

    async def refused(self, status: int, code: str, path: str, body: Any = None,
                      fields: list[tuple[int | None, str]] | None = None, **kw: Any) -> dict[str, Any]:
        """POST, check the problem, and that the log is as it was before."""
        before = await logged(self.served)
        answer = await self.post(path, body, **kw)
        doc = problem(answer, status, code, fields)
        self.headers = answer.headers
        assert await logged(self.served) == before, f"a request refused with {status} {code} appended"
        return doc


async def test_every_refusal_is_a_problem_document_and_appends_nothing(env: dict[str, str]) -> None:
    env = await migrated(env)
    async with serving(env, RUNLEDGER_HTTP_MAX_BODY_BYTES=str(MAX_BODY)) as served, \
            httpx.AsyncClient(timeout=30) as http:
        secret = str(add_source(served, "fleet")["secret"])
        add_source(served, "other")
        me = Client(http, served, "fleet", secret)
        ok = await me.post("/v1/streams/fleet:run-1/events", started())
        assert ok.status_code == 201, ok.text
        [first] = ok.json()["events"]
        route = "/v1/streams/fleet:run-2/events"

        # 400: not JSON; JSON but neither an object nor an array
        doc = await me.refused(400, "invalid_json", route, raw=b'{"type": "execution.started", "data": ')
        assert doc["errors"][0]["field"] == ""
        await me.refused(400, "invalid_body", route, raw=b'"execution.started"')
        await me.refused(400, "invalid_body", "/v1/events", raw=b"[]", headers=STRUCTURED)

        # 422: every failed field of every event named, with its index
        await me.refused(422, "invalid_event", route, [
            {**started(), "colour": "red"},
            {"type": "step.started"},
            {**started(), "time": "yesterday"},
            {"type": "step.started", "data": {"name": 7}},
            {"type": "no.such.type", "data": {}},
        ], fields=[(0, "colour"), (1, "data"), (2, "time"), (3, "data.step_id"), (3, "data.name"), (4, "type")])
        await me.refused(422, "invalid_event", route, {"type": "execution.started", "data": {}},
                         fields=[(None, "data.workflow")])
        await me.refused(422, "invalid_event", "/v1/events", {**cloudevent("fleet:run-2", "/producers/fleet"),
                                                             "specversion": "0.3", "subject": "no spaces"},
                         headers=STRUCTURED, fields=[(None, "specversion"), (None, "subject")])
        await me.refused(422, "invalid_stream", "/v1/streams/fleet:a%20b/events", started(),
                         fields=[(None, "stream")])

        # 401: a signature of another secret; a timestamp more than 5 minutes off
        other = str(json.loads(served.run("sources", "rotate", "other", "--json").stdout)["secret"])
        doc = await me.refused(401, "signature_invalid", route, started(), secret=other)
        await me.refused(401, "timestamp_out_of_range", route, started(),
                         at=datetime.now(UTC) - timedelta(minutes=5, seconds=30))
        await me.refused(401, "timestamp_out_of_range", "/v1/events", cloudevent("fleet:run-1", "/producers/fleet"),
                         headers=STRUCTURED, at=datetime.now(UTC) + timedelta(minutes=6))

        # 403: a stream outside the source's prefixes (either route); an event of another source
        await me.refused(403, "outside_grant", "/v1/streams/other:run-1/events", started())
        await me.refused(403, "outside_grant", "/v1/events", {**cloudevent("other:run-1", "/producers/fleet"),
                                                             "type": "execution.started", "data": {"workflow": "w"}},
                         headers=STRUCTURED)
        doc = await me.refused(403, "wrong_source", "/v1/events", cloudevent("fleet:run-1", "/producers/other"),
                               headers=STRUCTURED, fields=[(None, "source")])
        binary = {"content-type": "application/json", "ce-specversion": "1.0", "ce-id": str(uuid.uuid4()),
                  "ce-source": "/producers/other", "ce-type": "step.started", "ce-subject": "fleet:run-1"}
        await me.refused(403, "wrong_source", "/v1/events", {"step_id": "s1", "name": "n"}, headers=binary)

        # 409: expected_seq not the head; a chained event not linking to the head; a lifecycle that refuses it
        doc = await me.refused(409, "append_conflict", "/v1/streams/fleet:run-1/events?expected_seq=0",
                               {"type": "step.started", "data": {"step_id": "s1", "name": "n"}})
        assert (doc["stream"], doc["expected_seq"], doc["seq"]) == ("fleet:run-1", 0, 1)
        chained = {**cloudevent("fleet:run-1", "/producers/fleet"), "time": "2026-11-22T10:00:00Z",
                   "datacontenttype": "application/json", "seq": 1, "prevhash": GENESIS_HASH}
        chained["hash"] = compute_hash(chained)
        doc = await me.refused(409, "chain_conflict", "/v1/events", chained, headers=STRUCTURED)
        assert (doc["seq"], doc["hash"]) == (1, first["hash"])
        await me.refused(409, "illegal_transition", route, {"type": "step.started",
                                                            "data": {"step_id": "s1", "name": "n"}})

        # 413: an event over 512 KiB (the body within the limit); a body over the limit; over 1,000 events
        big = {"type": "execution.started", "data": {"workflow": "w", "input": {"blob": "x" * (600 * 1024)}}}
        doc = await me.refused(413, "too_large", route, big, fields=[(None, "data")])
        await me.refused(413, "too_large", "/v1/events", {**cloudevent("fleet:run-2", "/producers/fleet"),
                                                         "data": big["data"]}, headers=STRUCTURED)
        await me.refused(413, "body_too_large", route, [big, big])
        await me.refused(413, "batch_too_large", route, [started()] * 1001)

        # 415: a body of another media type; a CloudEvents request in neither mode
        doc = await me.refused(415, "unsupported_media_type", route, started(), headers={"content-type": "text/plain"})
        await me.refused(415, "unsupported_media_type", "/v1/events", cloudevent("fleet:run-1", "/producers/fleet"),
                         headers={"content-type": "application/xml"})
        await me.refused(415, "unsupported_media_type", "/v1/events", {"step_id": "s1"},
                         headers={**binary, "ce-source": "/producers/fleet", "content-type": "text/plain"})

        # A replayed webhook-id appends nothing and answers the same ids, seqs and hashes (200)
        before = await logged(served)
        msg_id = f"msg_{uuid.uuid4().hex}"
        body = [{"type": "step.started", "data": {"step_id": "s1", "name": "n"}},
                {"type": "step.completed", "data": {"step_id": "s1", "output": {}}}]
        appended = await me.post("/v1/streams/fleet:run-1/events", body, msg_id=msg_id)
        assert appended.status_code == 201, appended.text
        assert len(await logged(served)) == len(before) + 2
        ce_id = f"msg_{uuid.uuid4().hex}"
        event = {k: v for k, v in cloudevent("fleet:run-1", "/producers/fleet").items() if k != "id"}
        event["data"] = {"step_id": "s2", "name": "n"}  # no id: its idempotency key is the request's webhook-id
        ce = await me.post("/v1/events", event, STRUCTURED, msg_id=ce_id)
        assert ce.status_code == 201, ce.text
        assert len(await logged(served)) == len(before) + 3
        for path, content, headers, key, first_answer in [
                ("/v1/streams/fleet:run-1/events", body, None, msg_id, appended),
                ("/v1/events", event, STRUCTURED, ce_id, ce), ("/v1/events", event, STRUCTURED, ce_id, ce)]:
            again = await me.post(path, content, headers, msg_id=key)
            assert again.status_code == 200, again.text
            assert again.json()["events"] == [{**e, "duplicate": True} for e in first_answer.json()["events"]]
        assert len(await logged(served)) == len(before) + 3


async def test_over_the_rate_limit_both_routes_answer_429_with_retry_after(env: dict[str, str]) -> None:
    env = await migrated(env)
    async with serving(env) as served, httpx.AsyncClient(timeout=30) as http:
        secret = str(add_source(served, "slow", "--rate", "0.2", "--burst", "3")["secret"])
        me = Client(http, served, "slow", secret)
        ok = await me.post("/v1/streams/slow:run-1/events", [
            started(), {"type": "step.started", "data": {"step_id": "s1", "name": "n"}}])
        assert ok.status_code == 201, ok.text
        two = [{"type": "step.started", "data": {"step_id": f"s{i}", "name": "n"}} for i in (2, 3)]
        doc = await me.refused(429, "rate_limited", "/v1/streams/slow:run-1/events", two)
        assert "slow" in doc["detail"]
        assert 1 <= int(me.headers["Retry-After"]) <= 5  # 1 token missing (less what came back), 0.2 a second
        await me.refused(429, "rate_limited", "/v1/events", [
            cloudevent("slow:run-1", "/producers/slow"), cloudevent("slow:run-1", "/producers/slow")],
            headers={"content-type": "application/cloudevents-batch+json"})
        assert 1 <= int(me.headers["Retry-After"]) <= 5
        doc = await me.refused(429, "rate_limited", "/v1/streams/slow:run-1/events", [started()] * 4)
        assert "burst" in doc["detail"] and int(me.headers["Retry-After"]) == 15  # 3 at 0.2 a second
        one = await me.post("/v1/events", cloudevent("slow:run-1", "/producers/slow"), STRUCTURED)
        assert one.status_code == 201, one.text  # the third token was left


async def test_a_rotated_secret_appends_through_its_overlap_and_a_revoked_source_at_once_not(
        env: dict[str, str]) -> None:
    env = await migrated(env)
    async with serving(env) as served, httpx.AsyncClient(timeout=30) as http:
        old = str(add_source(served, "fleet")["secret"])
        me = Client(http, served, "fleet", old)
        assert (await me.post("/v1/streams/fleet:run-1/events", started())).status_code == 201
        rotated = served.run("sources", "rotate", "fleet", "--overlap", "3s", "--json")
        assert rotated.returncode == 0, rotated.stderr
        new = str(json.loads(rotated.stdout)["secret"])
        step = {"type": "step.started", "data": {"step_id": "s1", "name": "n"}}
        assert (await me.post("/v1/streams/fleet:run-1/events", step)).status_code == 201  # old, in the overlap
        step2 = {"type": "step.started", "data": {"step_id": "s2", "name": "n"}}
        assert (await me.post("/v1/streams/fleet:run-1/events", step2, secret=new)).status_code == 201

        async def old_refused() -> bool:
            answer = await me.post("/v1/streams/fleet:run-1/events", started("never"), msg_id="msg_old")
            return answer.status_code == 401

        await poll(old_refused, 20, "the old secret to end with its overlap")
        assert [e["seq"] for e in await logged(served, "fleet:run-1")] == [1, 2, 3]  # the refused appended nothing
        assert served.run("sources", "revoke", "fleet").returncode == 0
        step3 = {"type": "step.started", "data": {"step_id": "s3", "name": "n"}}
        await me.refused(401, "source_unknown", "/v1/streams/fleet:run-1/events", step3, secret=new)
