"""``runledger hash``: what a producer in another language debugs its hashing with."""

from __future__ import annotations

import subprocess

import orjson

from runledger.streams.cli.events import hash_report
from tests.conftest import CLI, VECTORS

VECTOR_LINES = [orjson.loads(line) for line in VECTORS.read_bytes().splitlines()]


def test_report_of_a_valid_event() -> None:
    vector = VECTOR_LINES[13]
    report = hash_report(orjson.dumps(vector["event"]).decode())
    assert report == {"id": vector["event"]["id"], "hash": vector["hash"], "canonical": vector["jcs"],
                      "valid": True, "error": None}


def test_report_of_a_tampered_event() -> None:
    event = {**VECTOR_LINES[0]["event"], "source": "/producers/mallory"}
    report = hash_report(orjson.dumps(event).decode())
    assert report["valid"] is False
    assert report["hash"] != event["hash"]
    assert report["error"].startswith("hash_mismatch")


def test_report_of_an_invalid_event_still_shows_its_hash() -> None:
    event = {**VECTOR_LINES[0]["event"], "type": "nope"}
    report = hash_report(orjson.dumps(event).decode())
    assert report["valid"] is False and report["error"].startswith("unknown_type")
    assert report["canonical"] is not None and len(report["hash"]) == 64


def test_command_reads_stdin_and_exits_1_on_any_invalid_line() -> None:
    lines = [orjson.dumps(v["event"]).decode() for v in VECTOR_LINES[:3]] + ["not json"]
    done = subprocess.run([*CLI, "hash"], input="\n".join(lines),
                          capture_output=True, text=True, check=False)
    reports = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [r["valid"] for r in reports] == [True, True, True, False]
    assert reports[3]["error"].startswith("invalid_json")
    assert done.returncode == 1


def test_command_refuses_an_event_with_two_members_of_one_name_whatever_its_hash() -> None:
    event = VECTOR_LINES[0]["event"]
    line = '{"data": {"workflow": "another"}, ' + orjson.dumps(event).decode()[1:]  # the last "data" is hashed
    assert orjson.loads(line) == event
    done = subprocess.run([*CLI, "hash"], input=orjson.dumps(event).decode() + "\n" + line,
                          capture_output=True, text=True, check=False)
    reports = [orjson.loads(out) for out in done.stdout.splitlines()]
    assert [r["valid"] for r in reports] == [True, False]
    assert reports[1]["error"] == 'invalid_event: data: duplicate member "data"'
    assert done.returncode == 1
