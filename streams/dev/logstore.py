"""The embedded broker's log store: the objects of Tansu's S3 engine in one SQLite file.

Tansu (the embedded Kafka broker) keeps its log as objects: one per produced batch
(``.../partitions/<p>/records/<offset>.batch``), a ``watermark.json`` per partition, the cluster's
``meta.json`` and the groups' offsets. It relies on the store for what S3 promises: conditional writes
(``If-None-Match: *`` creates only, ``If-Match`` replaces only the version it read, 412 otherwise),
strongly consistent reads and listings, and a write that lasts once answered. This store gives exactly that,
and nothing else of S3:

- Every write is a SQLite transaction in WAL mode, committed before it is answered: a kill -9 of the store (or
  of the broker, or of both) loses nothing that was acknowledged. By default a commit is in the operating
  system's page cache when answered, as a Kafka broker's acknowledged write is by default (``flush.messages``
  unset): it survives any process dying, not a power loss of the machine; ``fsync=True`` syncs each commit to
  disk first (``synchronous=FULL``).
- Listings read a key index, so their cost does not depend on how the keys are stored; a partition's keys
  are listed in key order, one page of up to 1,000 at a time.
- Tansu lists every key of a partition on every fetch. So that a partition does not hold one key per batch
  ever produced, runs of small batches are merged (``recordbatch.merge``) into batches of up to
  ``merge_bytes``: the merged batch takes the first batch's key and its modification time (Tansu's earliest
  offset is the base of the least recently modified key), the others are deleted, and the newest batch always
  keeps a key of its own (Tansu's end offset is the base of the most recently modified key + 1). A fetch that
  listed the deleted keys before the merge gets "not found" for them, fails, and is made again: it must never
  read a merged batch beside the batches it replaced, as a consumer would then take their records twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runledger.streams.dev.recordbatch import Batch, BatchFormatError, merge, parse

__all__ = ["Conflict", "Missing", "ObjectInfo", "ObjectStore", "PreconditionFailed", "StoreError", "etag_matches"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_us INTEGER NOT NULL,
    content_type TEXT,
    partition TEXT,              -- the records prefix of the Tansu partition a batch object belongs to
    merged INTEGER NOT NULL,     -- 0: a produced batch not yet considered for merging
    body BLOB NOT NULL           -- last, so that reading the other columns never walks a large body
);
CREATE UNIQUE INDEX IF NOT EXISTS objects_key ON objects (bucket, key);
CREATE INDEX IF NOT EXISTS objects_unmerged ON objects (partition, key) WHERE merged = 0;
CREATE INDEX IF NOT EXISTS objects_partition ON objects (partition, key);
"""
log = logging.getLogger(__name__)
_BATCH_KEY = re.compile(r"(?P<partition>.+/partitions/\d+/records/)(?P<offset>\d{20})\.batch")


class StoreError(Exception):
    """A request the store refuses; ``status`` and ``code`` are S3's."""

    status = 400
    code = "InvalidRequest"


class Missing(StoreError):
    status, code = 404, "NoSuchKey"


class NoBucket(StoreError):
    status, code = 404, "NoSuchBucket"


class PreconditionFailed(StoreError):
    status, code = 412, "PreconditionFailed"


class Conflict(StoreError):
    status, code = 409, "BucketNotEmpty"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    etag: str
    size: int
    mtime_us: int
    content_type: str | None = None
    body: bytes | None = None


def etag_of(body: bytes) -> str:
    return f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'


def _connect(path: Path, fsync: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit is in the WAL file (the page cache) when it returns; FULL: synced to disk too
    conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
    return conn


class ObjectStore:
    """The objects in one SQLite file; each write is one transaction, committed when the method returns.

    Not thread-safe: one caller (the server's event loop). A write takes tens of microseconds, so the loop
    serves it in place rather than hand it to a thread and back.
    """

    def __init__(self, path: Path, *, fsync: bool = False, merge_bytes: int = 1024 * 1024,
                 merge_run: int = 32) -> None:
        self.path = path
        self.merge_bytes, self.merge_run = merge_bytes, merge_run
        self._db = _connect(path, fsync)
        self._db.executescript(_SCHEMA)
        self._last_us: int = self._db.execute("SELECT coalesce(max(mtime_us), 0) FROM objects").fetchone()[0]
        self._due: set[str] = set()  # partitions written since the last merge_due()

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # Reads ------------------------------------------------------------------------------------------

    def bucket_exists(self, bucket: str) -> bool:
        return self._db.execute("SELECT 1 FROM buckets WHERE name = ?", (bucket,)).fetchone() is not None

    def get(self, bucket: str, key: str, *, body: bool = True) -> ObjectInfo:
        """The object at ``key``, or ``Missing``."""
        columns = "key, etag, size, mtime_us, content_type" + (", body" if body else "")
        row = self._db.execute(f"SELECT {columns} FROM objects WHERE bucket = ? AND key = ?",  # noqa: S608
                               (bucket, key)).fetchone()
        if row is None:
            if not self.bucket_exists(bucket):
                raise NoBucket(bucket)
            raise Missing(key)
        return ObjectInfo(*row)

    def listing(self, bucket: str, prefix: str, after: str, limit: int) -> list[ObjectInfo]:
        """Up to ``limit`` listed objects whose key starts with ``prefix`` and sorts after ``after``."""
        if not self.bucket_exists(bucket):
            raise NoBucket(bucket)
        start = max(prefix, after)
        query = ("SELECT key, etag, size, mtime_us FROM objects WHERE bucket = ? AND key >= ? AND key != ? "
                 "{} ORDER BY key LIMIT ?")
        if prefix:
            # every key with the prefix sorts below the prefix followed by the highest code point
            rows = self._db.execute(query.format("AND key < ?"), (bucket, start, after, prefix + "\U0010ffff",
                                                                  limit)).fetchall()
        else:
            rows = self._db.execute(query.format(""), (bucket, start, after, limit)).fetchall()
        return [ObjectInfo(*row) for row in rows]

    # Writes -----------------------------------------------------------------------------------------

    def create_bucket(self, bucket: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO buckets VALUES (?)", (bucket,))

    def delete_bucket(self, bucket: str) -> None:
        with self._transaction() as db:
            if not self.bucket_exists(bucket):
                raise NoBucket(bucket)
            if db.execute("SELECT 1 FROM objects WHERE bucket = ? LIMIT 1", (bucket,)).fetchone():
                raise Conflict(bucket)
            db.execute("DELETE FROM objects WHERE bucket = ?", (bucket,))
            db.execute("DELETE FROM buckets WHERE name = ?", (bucket,))

    def put(self, bucket: str, key: str, body: bytes, *, content_type: str | None = None,
            if_match: str | None = None, if_none_match: str | None = None) -> ObjectInfo:
        """Store ``body`` at ``key``, under S3's conditions: ``if_none_match='*'`` only if no object is there,
        ``if_match`` only if the object there has that ETag (``PreconditionFailed``; ``Missing`` if none is)."""
        etag = etag_of(body)
        found = _BATCH_KEY.fullmatch(key)
        with self._transaction() as db:
            if not self.bucket_exists(bucket):
                raise NoBucket(bucket)
            current = db.execute("SELECT etag FROM objects WHERE bucket = ? AND key = ?", (bucket, key)).fetchone()
            if if_none_match is not None and current is not None and (
                    if_none_match.strip() == "*" or etag_matches(current[0], if_none_match)):
                raise PreconditionFailed(key)
            if if_match is not None:
                if current is None:
                    raise Missing(key)
                if not etag_matches(current[0], if_match):
                    raise PreconditionFailed(key)
            mtime = self._tick()
            db.execute("INSERT OR REPLACE INTO objects (bucket, key, etag, size, mtime_us, content_type, partition,"
                       " merged, body) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                       (bucket, key, etag, len(body), mtime, content_type, found and found["partition"], body))
        if found:
            self._due.add(found["partition"])
        return ObjectInfo(key, etag, len(body), mtime, content_type)

    def delete(self, bucket: str, keys: list[str]) -> None:
        """Remove ``keys`` (S3 deletes a missing key without complaint)."""
        with self._transaction() as db:
            if not self.bucket_exists(bucket):
                raise NoBucket(bucket)
            db.executemany("DELETE FROM objects WHERE bucket = ? AND key = ?", [(bucket, key) for key in keys])

    def merge_due(self) -> None:
        """Merge the batches of the partitions written since the last call, where enough wait (``_merge``)."""
        due, self._due = self._due, set()
        for partition in due:
            try:
                self._merge(partition)
            except Exception:  # noqa: BLE001 - merging is an optimisation: the batches stay as they are
                log.exception("could not merge the batches of %s", partition)

    def _tick(self) -> int:
        """A modification time, in microseconds, later than every one given before."""
        self._last_us = max(time.time_ns() // 1000, self._last_us + 1)
        return self._last_us

    def _merge(self, partition: str) -> None:
        """Merge the partition's unmerged batches (all but the newest) into the batch before them, when enough
        of them wait."""
        with self._transaction() as db:
            if db.execute("SELECT count(*) FROM objects WHERE partition = ? AND merged = 0",
                          (partition,)).fetchone()[0] <= self.merge_run:
                return
            rows = db.execute("SELECT id, key, body FROM objects WHERE partition = ? AND merged = 0 "
                              "ORDER BY key", (partition,)).fetchall()[:-1]
            before = db.execute("SELECT id, key, body FROM objects WHERE partition = ? AND key < ? "
                                "ORDER BY key DESC LIMIT 1", (partition, rows[0][1])).fetchone()
            if before is not None and len(before[2]) < self.merge_bytes:  # merged before, and not full yet
                rows.insert(0, before)
            for group in self._groups(rows):
                ids = [row[0] for row in group]
                if len(group) == 1:
                    db.execute("UPDATE objects SET merged = 1 WHERE id = ?", (ids[0],))
                    continue
                try:
                    body = merge([(offset, batch) for _, _, offset, batch in group if batch is not None])
                except BatchFormatError as e:  # records a CRC does not show wrong: the batches stay as they are
                    log.warning("batches %s..%s of %s are kept unmerged: %s", group[0][1], group[-1][1], partition, e)
                    db.executemany("UPDATE objects SET merged = 1 WHERE id = ?", [(i,) for i in ids])
                    continue
                db.execute("UPDATE objects SET body = ?, etag = ?, size = ?, merged = 1 WHERE id = ?",
                           (body, etag_of(body), len(body), ids[0]))  # keeps the first batch's time
                db.executemany("DELETE FROM objects WHERE id = ?", [(i,) for i in ids[1:]])

    def _groups(self, rows: list[Any]) -> list[list[tuple[int, str, int, Batch | None]]]:
        """Consecutive runs of plain batches, each of at most ``merge_bytes``; anything else stands alone.
        ``rows``: (id, key, body) in key order; each part: (id, key, base offset, batch or None if unreadable)."""
        groups: list[list[tuple[int, str, int, Batch | None]]] = []
        end = size = -1
        for row_id, key, body in rows:
            offset = int(key[-26:-6])
            try:
                batch: Batch | None = parse(body)
            except BatchFormatError:
                batch = None
            part = (row_id, key, offset, batch)
            first = groups[-1][0][3] if groups else None
            if (batch is not None and batch.plain and offset == end and first is not None
                    and size + len(batch.records) <= self.merge_bytes and batch.attributes == first.attributes):
                groups[-1].append(part)
                size += len(batch.records)
            else:
                groups.append([part])
                size = len(body)
            end = offset + batch.last_offset_delta + 1 if batch is not None and batch.plain else -1
        return groups


def etag_matches(etag: str, header: str) -> bool:
    """Whether ``etag`` is one of the comma-separated ETags of a conditional header (weak ones compared too)."""
    wanted = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return etag in wanted or etag.strip('"') in wanted
