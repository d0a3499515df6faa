"""What an append request holds, read without I/O: binary-mode headers, every failed field with its index, keys."""

from __future__ import annotations

import orjson
import pytest

from runledger.streams.http.bodies import binary_event, cloudevents, event_key, request_key, simple_events
from runledger.streams.http.problems import Problem


def test_binary_mode_headers_are_the_attributes_percent_decoded() -> None:
    event = binary_event({"ce-specversion": "1.0", "CE-Source": "%2Fproducers%2Fa%20b", "ce-seq": "12",
                          "ce-prevhash": "ab", "ce-type": "step.started", "host": "x", "ce-": "ignored"},
                         {"step_id": "s"}, "application/json; charset=utf-8")
    assert event == {"specversion": "1.0", "source": "/producers/a b", "seq": 12, "prevhash": "ab",
                     "type": "step.started", "datacontenttype": "application/json", "data": {"step_id": "s"}}


def test_a_seq_header_that_is_no_integer_stays_text_to_be_named() -> None:
    assert binary_event({"ce-seq": "twelve"}, {}, None)["seq"] == "twelve"


def test_every_failed_field_is_named_with_its_index() -> None:
    body = orjson.dumps([{"type": "execution.started", "data": {}}, {"type": "nope", "data": {}},
                         {"data": {}, "extra": 1}])
    with pytest.raises(Problem) as caught:
        simple_events("bill-1", body, source_id="s", webhook_id=None)
    assert caught.value.status == 422
    assert [(e["field"], e["index"]) for e in caught.value.errors] == [
        ("data.workflow", 0), ("type", 1), ("extra", 2), ("type", 2)]


def test_one_object_has_no_index_and_bad_json_names_its_position() -> None:
    with pytest.raises(Problem) as caught:
        simple_events("bill-1", b'{"type": "x", "data": {}}', source_id="s", webhook_id=None)
    assert caught.value.errors == [{"field": "type", "reason": caught.value.errors[0]["reason"]}]
    with pytest.raises(Problem) as bad:
        simple_events("bill-1", b'[{"type": 1,]', source_id="s", webhook_id=None)
    assert bad.value.status == 400 and "line 1 column 13" in bad.value.detail


def test_an_idempotency_key_that_is_no_string_is_named_not_a_crash() -> None:
    """Found by schemathesis: an object as the key (unhashable) raised TypeError, a 500, where a 422 is due."""
    body = orjson.dumps([{"type": "step.started", "data": {}, "idempotency_key": {"a": 1}},
                         {"type": "step.started", "data": {}, "idempotency_key": ["k"]}])
    with pytest.raises(Problem) as caught:
        simple_events("bill-1", body, source_id="s", webhook_id=None)
    assert caught.value.status == 422
    assert [(e["field"], e["index"]) for e in caught.value.errors if e["field"] == "idempotency_key"] == [
        ("idempotency_key", 0), ("idempotency_key", 1)]


def test_keys_are_the_sources_own() -> None:
    assert event_key("a", "k", None, 0) != event_key("b", "k", None, 0)
    assert event_key("a", None, "msg", 0) != event_key("a", None, "msg", 1)
    assert event_key("a", None, None, 0) is None
    assert request_key("a:key", "x") != request_key("a", "key:x")  # no separator to forge


def test_a_request_without_events_of_the_binding_is_415() -> None:
    with pytest.raises(Problem) as caught:
        cloudevents("text/plain", {}, b"{}", source_id="s", webhook_id=None)
    assert caught.value.status == 415 and "Accept-Post" in caught.value.headers


def test_an_appends_query_is_read_as_fastapi_read_it_each_invalid_parameter_named() -> None:
    from starlette.requests import Request

    from runledger.streams.http.ingest import _query

    def query(text: str, *, expected_seq: bool = True) -> object:
        return _query(Request({"type": "http", "query_string": text.encode(), "headers": []}),
                      expected_seq=expected_seq)

    assert query("") == query("timeout=10")
    ok = query("expected_seq=0&wait=projected&timeout=60")
    assert (ok.expected_seq, ok.wait, ok.timeout) == (0, "projected", 60.0)  # type: ignore[attr-defined]
    assert query("expected_seq=-1", expected_seq=False).expected_seq is None  # type: ignore[attr-defined]
    for text, fields in [("expected_seq=-1", ["query.expected_seq"]), ("expected_seq=1.5", ["query.expected_seq"]),
                         ("expected_seq=%D9%A3", ["query.expected_seq"]),  # a digit, but not an ASCII one
                         ("timeout=0", ["query.timeout"]), ("timeout=61", ["query.timeout"]),
                         ("timeout=nan", ["query.timeout"]), ("timeout=x&wait=now", ["query.wait", "query.timeout"])]:
        with pytest.raises(Problem) as caught:
            query(text)
        assert caught.value.status == 422 and caught.value.code == "invalid_request", text
        assert [e["field"] for e in caught.value.errors] == fields, text
