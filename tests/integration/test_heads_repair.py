"""`runledger heads repair`: a head that a fork put on the branch workers do not project is moved back onto the
log's first branch, with what was staged on the other branch and its idempotency keys; the command says what it
moved."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import orjson
from redis.asyncio import Redis

from runledger.streams.producer.client import EventProducer
from runledger.streams.producer.events import NewEvent, build_events
from runledger.streams.producer.heads import StreamHeads
from runledger.streams.settings import Settings
from tests.conftest import CLI
from tests.integration.conftest import write_log
from tests.integration.test_heads_recovery import forked


def _heads(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "heads", *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


async def _on_the_ground_branch(settings: Settings, log: list[dict[str, Any]]) -> None:
    """Redis's head of ``forked`` at the ground branch's seq 3, as a recovery that chose by hash order left it, with
    that event's idempotency key and a batch staged on it by a producer that died."""
    ground3 = log[3]
    redis = Redis.from_url(settings.redis_url)
    try:
        prefix = settings.topic_prefix
        await redis.hset(f"{prefix}:head:forked", mapping={"seq": 3, "hash": ground3["hash"], "type": ground3["type"]})
        await redis.hset(f"{prefix}:idem:forked", "k3", orjson.dumps([3, ground3["id"], ground3["hash"]]))
        heads = StreamHeads(redis, prefix, 60_000)
        await heads.acquire("forked", "dead", 1)
        head = (await heads.read("forked", [])).head
        assert await heads.stage("forked", "dead", build_events("/t", "forked", head, [
            NewEvent("step.started", {"step_id": "s4", "name": "n"})]))
        await heads.release("forked", "dead")
    finally:
        await redis.aclose()


async def test_heads_repair_moves_a_head_on_another_branch_back_and_says_what_it_moved(
        env: dict[str, str], settings: Settings) -> None:
    log, first, _ = forked("forked")
    await write_log(settings, log)
    async with EventProducer(settings) as producer:  # Redis's heads recovered, and marked complete
        await producer.append("other", "execution.started", {"workflow": "w"})
    await _on_the_ground_branch(settings, log)
    check = _heads(env, "check", "--json")
    [row] = [r for r in map(orjson.loads, check.stdout.splitlines()) if r["stream"] == "forked"]
    [problem, *_] = row["problems"]
    assert "on another branch" in problem and "`runledger heads repair --stream forked`" in problem

    done = _heads(env, "repair", "--json")
    assert done.returncode == 0, done.stderr
    assert [orjson.loads(line) for line in done.stdout.splitlines()] == [{
        "stream": "forked", "from": {"seq": 3, "hash": log[3]["hash"]}, "to": {"seq": 2, "hash": first["hash"]},
        "moved": "back", "dropped_staged": {"first_seq": 4, "last_seq": 4}, "forgotten_keys": 1}]
    again = _heads(env, "repair")
    assert (again.returncode, again.stdout) == (0, "")
    assert "every head is at the end of the log's first branch" in again.stderr

    async with EventProducer(settings) as producer:
        after = await producer.append("forked", "step.started", {"step_id": "s9", "name": "n"},
                                      idempotency_key="k3")  # forgotten: appended anew, on the first branch
    assert (after.seq, after.duplicate, orjson.loads(after.value)["prevhash"]) == (3, False, first["hash"])


async def test_heads_repair_of_one_stream_in_words_and_its_errors(env: dict[str, str], settings: Settings) -> None:
    log, first, _ = forked("forked")
    await write_log(settings, log)
    async with EventProducer(settings) as producer:
        await producer.append("other", "execution.started", {"workflow": "w"})
    await _on_the_ground_branch(settings, log)
    done = _heads(env, "repair", "--stream", "forked")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"forked: moved back from seq 3 ({log[3]['hash']}) to seq 2 ({first['hash']}), the end of the log's first "
        "branch; dropped the batch staged on the other branch (seq 4..4); forgot 1 idempotency keys of the other "
        "branch's events\n")
    assert done.stderr == "1 heads moved\n"

    missing = _heads(env, "repair", "--stream", "nosuch")
    assert missing.returncode == 2 and "stream 'nosuch' has no valid event in" in missing.stderr
    assert "there is no branch to move its head to" in missing.stderr
    invalid = _heads(env, "repair", "--stream", "not a stream")
    assert invalid.returncode == 2 and "must be 1 to 200 characters" in invalid.stderr
    assert "moves its head to the end of the first branch" in " ".join(_heads(env, "repair", "--help").stdout.split())
