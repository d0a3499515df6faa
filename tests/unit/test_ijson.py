"""I-JSON (SPEC.md section 3): an object with two members of one name, at any depth, makes an event invalid
wherever its bytes are read, whatever its hash says; valid events are read as before."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runledger.schemas.chain import compute_hash, stored_event, stored_hash
from runledger.schemas.errors import DuplicateMember, InvalidJson
from runledger.schemas.events import decode_event, decode_json, parse_event
from runledger.schemas.ijson import duplicate_members, encoded_colons
from runledger.schemas.merkle import ProofError, inclusion_proof, leaf_hash
from runledger.schemas.proofs import INCLUSION_V1, check_proof
from runledger.schemas.verify import ChainAuditor, LogAuditor, LogEntry, StoredEvent
from runledger.streams.cli.common import InputError
from runledger.streams.cli.events import read_produce_input
from runledger.streams.producer.chains import logged
from tests.conftest import VECTOR_EVENTS
from tests.unit.test_proofs import RAWS, SIGNER, note

STARTED = VECTOR_EVENTS[0]  # execution.started, seq 1, with data.input {"doc", "pages"}


def with_member_first(event: dict[str, Any], name: str, value: Any) -> bytes:
    """``event``'s bytes with a member ``name`` written before all others: a parser that keeps the last member
    of a name reads ``event`` itself, hash and all."""
    return b"{" + orjson.dumps(name) + b":" + orjson.dumps(value) + b"," + orjson.dumps(event)[1:]


TWO_DATA = with_member_first(STARTED, "data", {"workflow": "another"})
NESTED = orjson.dumps(STARTED).replace(b'"pages":3', b'"pages":3,"pages":30')


def test_the_event_a_last_member_parser_reads_is_valid() -> None:
    assert orjson.loads(TWO_DATA) == STARTED and compute_hash(orjson.loads(TWO_DATA)) == STARTED["hash"]
    assert orjson.loads(NESTED)["data"]["input"]["pages"] == 30


@pytest.mark.parametrize("read", [decode_event, decode_json, parse_event, lambda v: parse_event(v.decode())],
                         ids=["decode_event", "decode_json", "parse_event", "parse_event-text"])
def test_two_members_of_one_name_are_an_invalid_event_whatever_its_hash(read: Any) -> None:
    with pytest.raises(DuplicateMember) as refused:
        read(TWO_DATA)
    assert refused.value.code == "invalid_event"
    assert refused.value.errors == [("data", 'duplicate member "data"')]
    assert str(refused.value) == 'data: duplicate member "data"'
    assert refused.value.decoded is not None and refused.value.decoded["subject"] == STARTED["subject"]


def test_a_nested_member_is_named_by_its_path() -> None:
    with pytest.raises(DuplicateMember, match=r'^data\.input\.pages: duplicate member "pages"$'):
        decode_event(NESTED)
    in_list = orjson.dumps({**STARTED, "data": {**STARTED["data"], "input": {"l": [1, {"k": 1}]}}})
    with pytest.raises(DuplicateMember, match=r'^data\.input\.l\[1\]\.k: duplicate member "k"$'):
        decode_event(in_list.replace(b'{"k":1}', b'{"k":1,"k":1}'))  # the same value twice is still two


def test_every_repeated_name_is_named_once_and_escaped_names_are_the_same_name() -> None:
    text = b'{"a":1,"b":{"x":1,"x":2,"x":3},"\\u0061":2,"c\\u0000":1,"c\\u0000":2}'
    assert duplicate_members(text, encoded_colons(orjson.loads(text))) == [
        ("a", 'duplicate member "a"'), ("c\\x00", 'duplicate member "c\\u0000"'), ("b.x", 'duplicate member "x"')]


@pytest.mark.parametrize("text", [b'{"a":"\\u003a","b":1}', b'{"a:":"\\u003A:","b":[{"c":":"}]}',
                                  '{"a":"\\u003a","b":1}', b'{"\\\\u003a":1}'])
def test_a_colon_written_as_an_escape_is_no_member(text: bytes | str) -> None:
    assert duplicate_members(text, encoded_colons(orjson.loads(text))) == []


@pytest.mark.parametrize("text", [b'{"a":"\\u003a","a":1}', '{"a":"\\u003a","a":1}', b'{"a":"x","a":":"}',
                                  b'{"a":1,"a":2,"b":"\\u003a"}', '{"a":1,"a":2,"b":"\\u003A"}'])
def test_a_repeated_name_is_found_beside_colons_in_strings(text: bytes | str) -> None:
    assert duplicate_members(text, encoded_colons(orjson.loads(text))) == [("a", 'duplicate member "a"')]


@pytest.mark.parametrize("text", [b'{"a":NaN,"a":1}', b'{"a":"\\ud800","a":1}', b'{"a":Infinity}'])
def test_what_orjson_refuses_stays_refused(text: bytes) -> None:
    with pytest.raises(InvalidJson):
        decode_event(text)


def test_valid_events_read_as_before() -> None:
    for event in VECTOR_EVENTS:
        assert decode_event(orjson.dumps(event)) == event
        assert decode_event(json.dumps(event, indent=2, ensure_ascii=True)) == event  # white space, escapes
        assert parse_event(json.dumps(event, separators=(" , ", " : "))).hash == event["hash"]
        assert stored_event(orjson.dumps(event))[2] == event["hash"]


def test_valid_events_are_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from runledger.schemas import ijson

    def second_parse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("parsed twice")

    monkeypatch.setattr(ijson.json, "loads", second_parse)
    for event in VECTOR_EVENTS:
        for value in (orjson.dumps(event), json.dumps(event, indent=1)):
            decode_event(value)
            stored_event(value.encode() if isinstance(value, str) else value)
    stored_event(orjson.dumps({**STARTED, "data": {**STARTED["data"], "input": {"f": 0.5, "k": "a:b"}}}))
    with pytest.raises(AssertionError, match="parsed twice"):
        decode_event(TWO_DATA)


_KEYS = st.text(alphabet="ab:\\\"é\U0001f600", max_size=3)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet="x:\\\"é\x00\U0001f600", max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, _JSON, max_size=4), st.booleans(), st.data())
def test_the_count_agrees_with_the_full_check(obj: dict[str, Any], ascii_only: bool, data: st.DataObject) -> None:
    text = json.dumps(obj, ensure_ascii=ascii_only)
    assert duplicate_members(text, encoded_colons(orjson.loads(text))) == []
    assert duplicate_members(text.encode(), encoded_colons(orjson.loads(text))) == []
    if obj:  # one member written twice, with another value the first time
        name = data.draw(st.sampled_from(sorted(obj)))
        twice = "{" + json.dumps(name) + ":" + json.dumps(data.draw(_JSON)) + "," + text[1:]
        expected = [(name.replace("\x00", "\\x00"), f"duplicate member {orjson.dumps(name).decode()}")]
        assert duplicate_members(twice, encoded_colons(orjson.loads(twice))) == expected
        assert duplicate_members(twice, None) == expected


def test_stored_events_are_checked_and_the_bare_hash_is_not() -> None:
    with pytest.raises(DuplicateMember, match=r'^data: duplicate member "data"$'):
        stored_event(TWO_DATA)
    with pytest.raises(DuplicateMember, match=r'^hash: duplicate member "hash"$'):
        stored_event(with_member_first(STARTED, "hash", "0" * 64))
    with pytest.raises(DuplicateMember, match=r'^data\.input\.pages: duplicate member "pages"$'):
        stored_event(NESTED)
    floats = orjson.dumps({**STARTED, "data": {**STARTED["data"], "input": {"f": 0.5}}})
    with pytest.raises(DuplicateMember, match=r'^data\.input\.f: duplicate member "f"$'):
        stored_event(floats.replace(b'"f":0.5', b'"f":0.5,"f":1.5'))  # the slow path of the hash
    assert stored_hash(TWO_DATA)[1:] == (STARTED["hash"], STARTED["hash"])  # the leaf hash of the bytes as ever


def test_the_chain_auditor_finds_an_event_that_is_not_i_json() -> None:
    rows = [StoredEvent(STARTED["subject"], 1, TWO_DATA, STARTED["id"], STARTED["hash"], STARTED["prevhash"])]
    [finding] = ChainAuditor().check(rows)
    assert (finding.stream_id, finding.seq, finding.event_id, finding.code) == (STARTED["subject"], 1,
                                                                                STARTED["id"], "invalid_event")
    assert 'data: duplicate member "data"' in finding.reason


def test_the_log_auditor_finds_an_event_that_is_not_i_json_in_its_stream() -> None:
    stream = [e for e in VECTOR_EVENTS if e["subject"] == STARTED["subject"]]
    log = [LogEntry(0, i, None, orjson.dumps(e)) for i, e in enumerate(stream)]
    log[2] = LogEntry(0, 2, None, with_member_first(stream[2], "seq", 2))
    auditor = LogAuditor()
    [finding] = [*auditor.check(log), *auditor.finish()]
    assert (finding.stream_id, finding.seq, finding.event_id, finding.code) == (STARTED["subject"], 3,
                                                                                stream[2]["id"], "invalid_event")
    assert (finding.partition, finding.offset) == (0, 2) and 'seq: duplicate member "seq"' in finding.reason


def test_a_proof_of_an_event_that_is_not_i_json_proves_nothing() -> None:
    # A proof in the retired single tree, whose leaf was the event's hash: the one place the same leaf (and so
    # the same proof) could stand for other bytes. (A partition's leaf is the record's bytes themselves.)
    leaves = [leaf_hash(bytes.fromhex(e["hash"])) for e in VECTOR_EVENTS]
    document = {"format": INCLUSION_V1, "checkpoint": note(18, "runledger.test/log", leaves), "leaf_index": 0,
                "event": base64.b64encode(RAWS[0]).decode(),
                "proof": [base64.b64encode(p).decode() for p in inclusion_proof(0, leaves)]}
    assert check_proof(document, SIGNER.verifier_key).leaf_index == 0
    assert leaf_hash(bytes.fromhex(stored_hash(TWO_DATA)[2])) == leaves[0]  # the same leaf, the same proof
    document["event"] = base64.b64encode(TWO_DATA).decode()
    with pytest.raises(ProofError, match=r'not I-JSON.*data: duplicate member "data"'):
        check_proof(document, SIGNER.verifier_key)


def test_produce_refuses_a_line_with_two_members_of_one_name() -> None:
    line = '{"stream": "s-1", "type": "execution.started", "data": {"workflow": "w"}, "data": {"workflow": "v"}}'
    with pytest.raises(InputError, match=r'^line 3: data: duplicate member "data"$'):
        read_produce_input(iter([(3, line)]))


def test_recovering_heads_from_the_log_skips_an_event_that_is_not_i_json() -> None:
    assert logged(TWO_DATA, 0, 0) is None
    assert logged(orjson.dumps(STARTED), 0, 1) == (STARTED["subject"], 1, STARTED["prevhash"], STARTED["hash"],
                                                   STARTED["type"], 0, 1)
