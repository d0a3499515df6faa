"""The hash chain against the shared vectors, and chain verification."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
import rfc8785
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from runledger.schemas.chain import (
    GENESIS_HASH,
    Head,
    canonical,
    compute_hash,
    link_error,
    stored_hash,
    verify_chain,
)
from tests.conftest import ROOT, VECTORS

SHARED = Path(os.environ.get("RUNLEDGER_SHARED_DIR", ROOT.parent / "shared")) / "vectors" / "chain-v1.jsonl"
VECTOR_FILES = [VECTORS] + ([SHARED] if SHARED.exists() else [])


def load(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def test_copy_matches_shared_vectors() -> None:
    assert len(load(VECTORS)) == 18
    if SHARED.exists():
        assert VECTORS.read_bytes() == SHARED.read_bytes()


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: str(p.parent.parent.name))
def test_every_vector_reproduces_byte_for_byte(path: Path) -> None:
    for vector in load(path):
        event = vector["event"]
        assert canonical(event).decode() == vector["jcs"]
        assert compute_hash(event) == vector["hash"] == event["hash"]


def _mutations(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value - 1 if value > 0 else value + 1]
    if isinstance(value, float):
        return [value * 2 + 1]
    if isinstance(value, str):
        return [value + "x", value[:-1] if value else "x"]
    if value is None:
        return [0]
    if isinstance(value, dict):
        return [{**value, "extra": 1}]
    return [[*value, 1]]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every attribute and every nested value, as key paths."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            out += _paths(value, (*prefix, index))
    return out


def test_changing_any_single_attribute_breaks_the_hash() -> None:
    checked = 0
    for vector in load(VECTORS):
        event = vector["event"]
        for path in _paths({k: v for k, v in event.items() if k != "hash"}):
            parent = event
            for key in path[:-1]:
                parent = parent[key]
            for changed in _mutations(parent[path[-1]]):
                mutated = copy.deepcopy(event)
                target = mutated
                for key in path[:-1]:
                    target = target[key]
                target[path[-1]] = changed
                assert compute_hash(mutated) != vector["hash"], path
                checked += 1
    assert checked > 300


def test_fast_canonical_form_equals_rfc8785_on_random_objects() -> None:
    rng = random.Random(1)
    alphabet = ["a", "B", "é", "\u2028", "\x07", "\ue000", "😀", '"', "\\", "日", "0"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))

    def value(depth: int) -> Any:
        kind = rng.randint(0, 7 if depth < 3 else 4)
        if kind == 0:
            return rng.randint(-(2**53) + 1, 2**53 - 1)
        if kind == 1:
            return rng.choice([0.1, 1e21, 1e-7, -0.0, 4.5, 1.0, 333333333.3333333])
        if kind == 2:
            return text()
        if kind == 3:
            return rng.choice([True, False, None])
        if kind == 4:
            return rng.randint(0, 100)
        if kind == 5:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {text(): value(depth + 1) for _ in range(rng.randint(0, 4))}

    for _ in range(2000):
        obj = {text(): value(0) for _ in range(rng.randint(1, 5))}
        obj.pop("hash", None)
        assert canonical(obj) == rfc8785.dumps(obj), obj


def _chain(n: int, subject: str = "s") -> list[dict[str, Any]]:
    events, prev = [], GENESIS_HASH
    for seq in range(1, n + 1):
        event = {"subject": subject, "seq": seq, "prevhash": prev, "data": {"n": seq}}
        event["hash"] = prev = compute_hash(event)
        events.append(event)
    return events


def test_intact_chains_verify() -> None:
    assert verify_chain(_chain(5, "a") + _chain(3, "b")) == []


@pytest.mark.parametrize(
    ("tamper", "seq", "code"),
    [
        (lambda ev: ev[2]["data"].update(n=99), 3, "hash_mismatch"),
        (lambda ev: ev.pop(2), 4, "seq_gap"),
        (lambda ev: ev.insert(3, copy.deepcopy(ev[1])), 2, "seq_conflict"),
    ],
    ids=["altered", "missing", "replayed"],
)
def test_a_break_names_the_seq_and_why(tamper: Any, seq: int, code: str) -> None:
    events = _chain(6)
    tamper(events)
    [broken] = verify_chain(events)
    assert (broken.subject, broken.seq, broken.code) == ("s", seq, code)


def test_a_forked_prevhash_is_a_broken_chain() -> None:
    events = _chain(3)
    forked = {"subject": "s", "seq": 3, "prevhash": events[0]["hash"], "data": {}}
    forked["hash"] = compute_hash(forked)
    [broken] = verify_chain([*events[:2], forked])
    assert (broken.seq, broken.code) == (3, "chain_broken")


def test_link_error_of_the_first_event() -> None:
    assert link_error(Head(), {"seq": 1, "prevhash": GENESIS_HASH}) is None
    assert link_error(Head(), {"seq": 1, "prevhash": "1" * 64})[0] == "chain_broken"  # type: ignore[index]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _JSON, max_size=6))
def test_the_fast_hash_of_decoded_json_is_the_jcs_hash(body: dict[str, Any]) -> None:
    try:
        event = orjson.loads(orjson.dumps(body))  # as it would arrive: decoded from JSON bytes
    except orjson.JSONEncodeError:
        assume(False)  # a lone surrogate, or an integer orjson cannot write: never on the wire
    event["hash"] = "ignored"
    try:
        expected = hashlib.sha256(rfc8785.dumps({k: v for k, v in event.items() if k != "hash"})).hexdigest()
    except (ValueError, TypeError) as e:  # beyond ±(2^53 - 1): JCS has no form for it
        with pytest.raises(type(e)):
            compute_hash(event)
        return
    assert compute_hash(event) == expected


def test_the_hash_takes_the_slow_path_where_orjson_differs() -> None:
    for data in ({"x": 1.0}, {"x": 1e21}, {"x": [0.1, -2.5e-7]}, {"\U0001f600": 1, "\uffff": 2}):
        event = orjson.loads(orjson.dumps({"data": data}))
        assert compute_hash(event) == hashlib.sha256(rfc8785.dumps(event)).hexdigest()


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _JSON, max_size=6), st.booleans())
def test_the_hash_of_stored_bytes_is_the_jcs_hash(body: dict[str, Any], ascii_only: bool) -> None:
    """Stored bytes as orjson writes them, or with every character outside ASCII escaped (\\uXXXX)."""
    body.pop("hash", None)
    try:
        raw = json.dumps({**body, "hash": "h"}).encode() if ascii_only else orjson.dumps({**body, "hash": "h"})
        expected = hashlib.sha256(rfc8785.dumps(orjson.loads(orjson.dumps(body)))).hexdigest()
    except (orjson.JSONEncodeError, ValueError, TypeError):
        assume(False)  # a lone surrogate, or an integer JCS has no form for: refused before it is stored
    event, carried, computed = stored_hash(raw)
    assert (carried, computed) == ("h", expected) and "hash" not in event


def test_the_hash_of_stored_bytes_sees_floats_and_keys_outside_the_bmp() -> None:
    for body in ({"x": 1.0}, {"x": [2, 1e21]}, {"\U0001f600": 1, "\uffff": 2}):
        expected = hashlib.sha256(rfc8785.dumps(body)).hexdigest()
        for raw in (orjson.dumps({**body, "hash": "h"}), json.dumps({**body, "hash": "h"}).encode()):
            assert stored_hash(raw)[2] == expected


def test_the_hash_of_stored_bytes_refuses_integers_jcs_has_no_form_for() -> None:
    largest = 2**53 - 1
    for value in (largest, -largest, 10**15, 0):
        raw = orjson.dumps({"data": {"n": value}, "hash": "h"})
        assert stored_hash(raw)[2] == hashlib.sha256(rfc8785.dumps({"data": {"n": value}})).hexdigest()
    for value in (largest + 2, -(largest + 2), 10**20):
        with pytest.raises(ValueError):
            stored_hash(b'{"data":{"n":%d},"hash":"h"}' % value)
