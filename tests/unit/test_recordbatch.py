"""Merging stored record batches: the merged batch reads, with aiokafka's own decoder, as the same records at the
same offsets and times; anything that is not a plain v2 batch is refused."""

from __future__ import annotations

import struct

import pytest
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from hypothesis import given
from hypothesis import strategies as st

from runledger.streams.dev.recordbatch import BatchFormatError, merge, parse

Record = tuple[int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]  # timestamp, key, value, headers


def build(records: list[Record], *, compression: int = 0, transactional: int = 0, producer_id: int = -1) -> bytes:
    builder = DefaultRecordBatchBuilder(2, compression, transactional, producer_id, -1 if producer_id < 0 else 0,
                                        -1 if producer_id < 0 else 0, 10**9)
    for delta, (timestamp, key, value, headers) in enumerate(records):
        builder.append(delta, timestamp, key, value, headers)
    return bytes(builder.build())


def read(data: bytes) -> list[tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]]:
    batch = DefaultRecordBatch(bytearray(data))
    assert batch.validate_crc()
    return [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in batch]


records = st.lists(st.tuples(st.integers(0, 2**41), st.none() | st.binary(max_size=20),
                             st.none() | st.binary(max_size=300),
                             st.lists(st.tuples(st.text(max_size=5), st.none() | st.binary(max_size=5)), max_size=2)),
                   min_size=1, max_size=8)


@given(st.lists(records, min_size=1, max_size=6), st.integers(0, 2**40))
def test_a_merged_batch_holds_every_record_at_its_offset_and_time(batches: list[list[Record]], first: int) -> None:
    parts, expected, offset = [], [], first
    for batch in batches:
        data = build(batch)
        parts.append((offset, parse(data)))
        expected += [(offset + i, *record) for i, record in enumerate(batch)]
        offset += len(batch)
    merged = merge(parts)
    assert read(merged) == expected
    header = parse(merged)
    assert struct.unpack_from(">q", merged)[0] == first
    assert header.count == len(expected) and header.last_offset_delta == len(expected) - 1
    assert header.max_timestamp == max(t for _, t, *_ in expected)


def test_what_is_not_one_plain_batch_is_refused() -> None:
    plain = build([(1, b"k", b"v", [])])
    with pytest.raises(BatchFormatError, match="CRC"):
        parse(plain[:-1] + b"w")
    with pytest.raises(BatchFormatError, match="batch length"):
        parse(plain + b"\0")
    with pytest.raises(BatchFormatError, match="shorter"):
        parse(plain[:20])
    for other in (build([(1, b"k", b"v", [])], compression=1), build([(1, b"k", b"v", [])], transactional=1),
                  build([(1, b"k", b"v", [])], producer_id=7)):
        assert not parse(other).plain
        with pytest.raises(BatchFormatError, match="cannot be merged"):
            merge([(0, parse(plain)), (1, parse(other))])
    with pytest.raises(BatchFormatError, match="does not follow"):
        merge([(0, parse(plain)), (2, parse(plain))])
