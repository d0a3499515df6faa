"""Kafka record batches (magic v2) as the embedded broker stores them, and merging consecutive ones into one.

Tansu's S3 engine writes one object per produced batch, in Kafka's wire format (base offset, batch length,
leader epoch, magic, CRC-32C, attributes, last offset delta, timestamps, producer id/epoch/sequence, record
count, records), and takes each batch's base offset from the object's key, not from its bytes. The log store
(``logstore.py``) merges runs of small batches into one batch so that the number of objects per partition
does not grow with every produce. A merged batch holds the same records with the same offsets, timestamps,
keys, values and headers: each record keeps its bytes after its first three fields, and only its offset and
timestamp deltas, which are relative to the batch, are written anew. Only plain batches are merged
(uncompressed, create time, not transactional, not control, no producer id); anything else is left as it is.

Pure: no I/O. Layout: https://kafka.apache.org/documentation/#recordbatch
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from aiokafka.record.util import calc_crc32c

__all__ = ["HEADER", "Batch", "BatchFormatError", "merge", "parse"]

# base offset, batch length, leader epoch, magic, crc, attributes, last offset delta, base timestamp,
# max timestamp, producer id, producer epoch, base sequence, record count
HEADER = struct.Struct(">qiibIhiqqqhii")
_CRC_FROM = 21  # the CRC covers everything from the attributes on
_LENGTH_FROM = 12  # the batch length counts everything after itself
_NOT_PLAIN = 0x07 | 0x08 | 0x10 | 0x20 | 0x40  # compression, log-append time, transactional, control, delete horizon


class BatchFormatError(ValueError):
    """Bytes that are not one whole magic-v2 record batch."""


@dataclass(frozen=True, slots=True)
class Batch:
    """One stored record batch, its header decoded and its records kept as bytes."""

    leader_epoch: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    count: int
    records: bytes

    @property
    def plain(self) -> bool:
        """Whether it may be merged: uncompressed, not transactional or control, from no idempotent producer."""
        return not self.attributes & _NOT_PLAIN and self.producer_id == -1


def parse(data: bytes) -> Batch:
    """The batch ``data`` holds, refused (``BatchFormatError``) unless it is exactly one v2 batch with a valid CRC."""
    if len(data) < HEADER.size:
        raise BatchFormatError(f"{len(data)} bytes is shorter than a record batch header")
    (_, length, epoch, magic, crc, attributes, last_delta, base_ts, max_ts, pid, pepoch, bseq,
     count) = HEADER.unpack_from(data)
    if magic != 2:
        raise BatchFormatError(f"magic {magic}, not 2")
    if length + _LENGTH_FROM != len(data):
        raise BatchFormatError(f"batch length {length} does not match the {len(data)} bytes stored")
    if calc_crc32c(data[_CRC_FROM:]) != crc:
        raise BatchFormatError("CRC-32C does not match")
    return Batch(epoch, attributes, last_delta, base_ts, max_ts, pid, pepoch, bseq, count, data[HEADER.size:])


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint at ``pos``: (value, position after it)."""
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise BatchFormatError("varint longer than 10 bytes")


def _put_varint(out: bytearray, value: int) -> None:
    value = (value << 1) ^ (value >> 63)
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def merge(parts: list[tuple[int, Batch]]) -> bytes:
    """One batch holding the records of ``parts``: (base offset, batch) pairs, consecutive and plain.

    The result's base offset is the first part's; each record keeps its absolute offset and timestamp."""
    first_offset, first = parts[0]
    base_ts = first.base_timestamp
    out = bytearray()
    expected = first_offset
    for offset, batch in parts:
        if not batch.plain or batch.attributes != first.attributes:
            raise BatchFormatError(f"the batch at offset {offset} cannot be merged (attributes {batch.attributes})")
        if offset != expected:
            raise BatchFormatError(f"the batch at offset {offset} does not follow the one ending at {expected - 1}")
        expected = offset + batch.last_offset_delta + 1
        if offset == first_offset:  # its records' deltas are relative to the merged batch already
            out += batch.records
            continue
        records, pos = batch.records, 0
        for _ in range(batch.count):
            length, body = _varint(records, pos)
            end = body + length
            attributes = records[body]
            ts_delta, at = _varint(records, body + 1)
            offset_delta, rest = _varint(records, at)
            record = bytearray((attributes,))
            _put_varint(record, batch.base_timestamp + ts_delta - base_ts)
            _put_varint(record, offset + offset_delta - first_offset)
            record += records[rest:end]
            _put_varint(out, len(record))
            out += record
            pos = end
        if pos != len(records):
            raise BatchFormatError(f"the batch at offset {offset} has bytes after its {batch.count} records")
    count = sum(batch.count for _, batch in parts)
    tail = struct.pack(">hiqqqhii", first.attributes, expected - 1 - first_offset, base_ts,
                       max(batch.max_timestamp for _, batch in parts), -1, -1, -1, count) + out
    head = struct.pack(">qiibI", first_offset, len(tail) + 9, first.leader_epoch, 2, calc_crc32c(tail))
    return head + tail
