"""A Node.js producer nobody here wrote (the npm ``cloudevents`` SDK building structured- and binary-mode requests,
the npm ``standardwebhooks`` package signing them: tests/node/node_client.mjs) appends through a real
``runledger serve``; a real worker projects what it appended exactly as it projects the same events appended by the
Python producer."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from typing import Any

import asyncpg
import orjson
import pytest

from runledger.schemas.chain import GENESIS_HASH, compute_hash
from runledger.schemas.times import parse_utc_time
from runledger.streams.producer.client import EventProducer
from runledger.streams.producer.events import NewEvent
from tests.conftest import ROOT
from tests.integration.conftest import poll, running_worker, settings_of
from tests.integration.httpapi.serving import add_source, logged, migrated, serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NODE_DIR = ROOT / "tests" / "node"
SOURCE = "/producers/node-fleet"

# Each projected table's rows of a stream, without what differs between two streams of the same events (their ids,
# hashes and the wall-clock time of the projection).
ROWS = {
    "executions": "SELECT * FROM executions WHERE stream_id = $1",
    "steps": "SELECT * FROM steps WHERE stream_id = $1 ORDER BY step_id",
    "costs": "SELECT * FROM costs WHERE stream_id = $1 ORDER BY seq",
    "artifacts": "SELECT * FROM artifacts WHERE stream_id = $1 ORDER BY artifact_id",
}
DIFFERING = {"stream_id", "event_id", "last_hash", "updated_at"}


def node_client() -> list[str]:
    """The command that runs the Node client; fails (never skips) saying what to do if Node or its packages lack."""
    node = shutil.which("node")
    assert node, "node is not installed: ./dev test installs Debian's nodejs (or install Node.js 18 or later)"
    for package in ("cloudevents", "standardwebhooks"):
        assert (NODE_DIR / "node_modules" / package / "package.json").is_file(), (
            f"the npm package {package} is not installed: run `npm ci` in tests/node (./dev test does)")
    return [node, str(NODE_DIR / "node_client.mjs")]


async def run(command: list[str], env: dict[str, str]) -> bytes:
    """``command``'s output (in tests/node, where Node finds the packages), or a failure with its error output."""
    process = await asyncio.create_subprocess_exec(*command, env={**os.environ, **env}, cwd=NODE_DIR,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    return out


async def run_node(env: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(await run(node_client(), env))
    return result


async def rows(conn: asyncpg.Connection, stream: str) -> dict[str, list[dict[str, Any]]]:
    return {table: [{k: v for k, v in dict(r).items() if k not in DIFFERING} for r in await conn.fetch(sql, stream)]
            for table, sql in ROWS.items()}


def assert_chained(events: list[dict[str, Any]]) -> None:
    prevhash = GENESIS_HASH
    for seq, event in enumerate(events, 1):
        assert (event["seq"], event["prevhash"]) == (seq, prevhash)
        assert event["hash"] == compute_hash(event)
        prevhash = event["hash"]


async def test_a_node_client_with_the_cloudevents_sdk_appends_a_stream_that_is_projected_exactly(
        env: dict[str, str]) -> None:
    command = node_client()  # before anything starts: a missing package fails at once
    assert command
    env = await migrated(env)
    env["RUNLEDGER_CONSUMER_GROUP"] = f"g-{env['RUNLEDGER_DB_SCHEMA']}"
    stream, simple_stream, twin = (f"node-{kind}-{uuid.uuid4().hex[:8]}" for kind in ("ce", "simple", "twin"))
    async with serving(env) as served, running_worker(served.env):
        secret = str(add_source(served, "node-fleet", append_prefix="node-")["secret"])
        out = await run_node({"RUNLEDGER_URL": served.url, "RUNLEDGER_SOURCE_ID": "node-fleet",
                              "RUNLEDGER_SOURCE": SOURCE, "RUNLEDGER_SECRET": secret, "RUNLEDGER_STREAM": stream,
                              "RUNLEDGER_SIMPLE_STREAM": simple_stream})

        sent, answers = out["sent"], out["answers"]
        assert [s["mode"] for s in sent] == ["structured", "binary"] * 4 + ["structured"]
        assert sent[0]["headers"]["content-type"].startswith("application/cloudevents+json")
        assert "ce-id" in sent[1]["headers"] and sent[1]["headers"]["content-type"].startswith("application/json")
        assert [a["status"] for a in answers] == [201] * len(sent), answers
        assert all(a["content_type"] == "application/json" for a in answers)

        log = await logged(served, stream)
        assert len(log) == len(sent)
        assert_chained(log)
        for event, sdk, answer in zip(log, sent, answers, strict=True):
            made = sdk["event"]  # what the SDK made: its id, type, time and data are the logged event's
            assert (event["id"], event["type"], event["subject"], event["data"]) == (
                made["id"], made["type"], stream, made["data"])
            assert parse_utc_time(event["time"]) == parse_utc_time(made["time"])
            assert event["source"] == SOURCE and event["specversion"] == "1.0"
            assert answer["body"]["stream"] == stream
            assert answer["body"]["events"] == [{"id": event["id"], "seq": event["seq"], "hash": event["hash"],
                                                 "duplicate": False}]
        assert answers[-1]["body"]["projected"] is True, answers[-1]  # ?wait=projected: read-your-writes

        replayed = out["replayed"]  # the same webhook-id and body again: the same answer, nothing appended
        assert replayed["status"] == 200, replayed
        assert replayed["body"]["events"] == [{**answers[2]["body"]["events"][0], "duplicate": True}]
        assert len(await logged(served, stream)) == len(sent)

        simple = out["simple"]
        assert simple["status"] == 201, simple
        simple_log = await logged(served, simple_stream)
        assert_chained(simple_log)
        assert [e["type"] for e in simple_log] == ["execution.started", "step.started", "step.completed",
                                                   "execution.completed"]
        assert [(e["id"], e["seq"], e["hash"]) for e in simple_log] == [
            (a["id"], a["seq"], a["hash"]) for a in simple["body"]["events"]]
        assert {e["source"] for e in simple_log} == {SOURCE}

        # The same events appended by the Python producer to a twin stream: projected, both streams' rows are
        # the same but for their ids and hashes.
        settings = settings_of(served.env)
        async with EventProducer(settings) as producer:
            await producer.append_batch(twin, [NewEvent(e["type"], e["data"], time=parse_utc_time(e["time"]))
                                               for e in log], source=SOURCE)
        conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": settings.db_schema})
        try:
            async def projected() -> bool:
                done = await conn.fetch("SELECT stream_id FROM executions WHERE stream_id = ANY($1) AND status = "
                                        "'completed'", [stream, simple_stream, twin])
                return len(done) == 3

            await poll(projected, 60, "the three streams to be projected")
            mine, theirs = await rows(conn, stream), await rows(conn, twin)
            assert mine == theirs
            [execution] = mine["executions"]
            assert (execution["workflow"], execution["agent_id"], execution["customer_id"]) == (
                "invoice-triage", "agent-node", "acme")
            assert (execution["steps_total"], execution["steps_completed"], execution["last_seq"]) == (2, 2, 9)
            assert (execution["input_tokens"], execution["output_tokens"]) == (2000, 420)
            assert str(execution["cost_usd"]) == "0.010200" and str(execution["budget_usd"]) == "2.50"
            assert execution["duration_ms"] == 8000
            assert [(s["step_id"], s["status"], str(s["cost_usd"])) for s in mine["steps"]] == [
                ("s1", "completed", "0.006000"), ("s2", "completed", "0.004200")]
            assert [(c["seq"], c["provider"], c["cost_source"]) for c in mine["costs"]] == [
                (3, "openai", "event"), (6, "anthropic", "event")]
            assert [a["artifact_id"] for a in mine["artifacts"]] == ["art-1"]
            audit = await conn.fetch("SELECT event_id::text, seq FROM audit_log WHERE stream_id = $1 ORDER BY seq",
                                     stream)
            assert [(r["event_id"], r["seq"]) for r in audit] == [(e["id"], e["seq"]) for e in log]
            simple_row = await conn.fetchrow("SELECT workflow, steps_completed FROM executions WHERE stream_id = $1",
                                             simple_stream)
            assert tuple(simple_row) == ("refund", 1)
        finally:
            await conn.close()


def readme_examples() -> tuple[str, str]:
    """The README's Node.js and curl examples ("Appending from another language"), as a reader copies them."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Appending from another language"):]
    section = section[:section.index("\n## ", 1)]
    [js] = re.findall(r"```js\n(.*?)```", section, flags=re.S)
    shells = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    [curl] = [block for block in shells if "curl " in block]
    return js, curl


async def test_the_readme_examples_in_node_and_curl_append(env: dict[str, str]) -> None:
    node = node_client()[0]
    js, curl = readme_examples()
    env = await migrated(env)
    async with serving(env) as served:
        done = served.run(*"sources add fleet-ts --source /producers/fleet-ts --append-prefix fleet-ts: "
                           "--read-prefix fleet-ts: --json".split())
        assert done.returncode == 0, done.stderr
        secret = orjson.loads(done.stdout)["secret"]
        out = await run([node, "--input-type=module", "-e", js], {"RUNLEDGER_URL": served.url,
                                                                   "RUNLEDGER_SECRET": secret})
        assert b"seq: 2" in out, out
        assert "secret='whsec_...'" in curl and "http://127.0.0.1:8080" in curl
        script = curl.replace("secret='whsec_...'", f"secret='{secret}'").replace("http://127.0.0.1:8080",
                                                                                  served.url)
        answer = orjson.loads(await run(["bash", "-euo", "pipefail", "-c", script], {}))
        assert [e["seq"] for e in answer["events"]] == [3], answer
        log = await logged(served, "fleet-ts:run-42")
        assert_chained(log)
        assert [(e["type"], e["source"]) for e in log] == [
            ("execution.started", "/producers/fleet-ts"), ("step.started", "/producers/fleet-ts"),
            ("step.completed", "/producers/fleet-ts")]
