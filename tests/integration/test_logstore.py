"""The embedded log's store (``python -m runledger.streams.dev.s3server``) over HTTP, held to what the S3 API
documents for the calls Tansu makes: conditional writes (PutObject ``If-None-Match: *`` and ``If-Match``, 412
on conflict, 404 for ``If-Match`` on no object), conditional reads (304, 412), ListObjectsV2 (prefix,
delimiter, pages joined by continuation tokens), DeleteObject(s); an answered write survives kill -9; and small
record batches are merged so a partition's keys do not grow with every produce, every record staying readable."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest
from aiokafka.record.default_records import DefaultRecordBatch

from tests.conftest import free_ports
from tests.unit.test_recordbatch import build

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
PARTITION = "clusters/c/topics/t/partitions/0000000000/records/"


class Store:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "runledger.streams.dev.s3server", "--dir",
                                         str(self.directory), "--port", str(self.port), "--bucket", "b"])
        deadline = time.monotonic() + 30
        while True:
            try:
                self.request("HEAD", "/b")
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            answer = conn.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            conn.close()

    def keys(self, prefix: str, **params: str) -> tuple[list[str], list[str], ElementTree.Element]:
        query = "&".join(f"{k.replace('_', '-')}={v}" for k, v in {"list_type": "2", "prefix": prefix,
                                                                    **params}.items())
        status, _, body = self.request("GET", f"/b?{query}")
        assert status == 200, body
        root = ElementTree.fromstring(body)
        return ([e.text or "" for e in root.iter(f"{NS}Key")],
                [e.text or "" for e in root.iter(f"{NS}Prefix") if e is not root.find(f"{NS}Prefix")], root)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    running = Store(tmp_path / "store")
    running.start()
    yield running
    if running.process is not None and running.process.poll() is None:
        running.process.terminate()
        running.process.wait(10)


def test_conditional_writes_and_reads(store: Store) -> None:
    status, headers, _ = store.request("PUT", "/b/w.json", b"one", {"If-None-Match": "*"})
    assert status == 200
    first = headers["etag"]
    assert store.request("PUT", "/b/w.json", b"two", {"If-None-Match": "*"})[0] == 412  # creates only
    assert store.request("PUT", "/b/w.json", b"two", {"If-Match": '"0000"'})[0] == 412  # not the version read
    assert store.request("PUT", "/b/missing.json", b"x", {"If-Match": first})[0] == 404
    status, headers, _ = store.request("PUT", "/b/w.json", b"two", {"If-Match": first})
    assert status == 200 and headers["etag"] != first
    assert store.request("PUT", "/b/w.json", b"three", {"If-Match": first})[0] == 412  # that version is gone
    status, got, body = store.request("GET", "/b/w.json")
    assert (status, body, got["etag"]) == (200, b"two", headers["etag"])
    assert store.request("GET", "/b/w.json", headers={"If-None-Match": headers["etag"]})[0] == 304
    assert store.request("GET", "/b/w.json", headers={"If-None-Match": first})[0] == 200
    assert store.request("GET", "/b/w.json", headers={"If-Match": first})[0] == 412
    assert store.request("GET", "/b/w.json", headers={"Range": "bytes=1-"})[2] == b"wo"
    status, got, body = store.request("HEAD", "/b/w.json")
    assert (status, got["content-length"], body) == (200, "3", b"")
    assert store.request("PUT", "/b/any.json", b"x")[0] == 200 and store.request("PUT", "/b/any.json", b"y")[0] == 200
    assert store.request("GET", "/b/none")[0] == 404 and store.request("GET", "/nobucket/x")[0] == 404
    assert store.request("DELETE", "/b/w.json")[0] == 204 and store.request("GET", "/b/w.json")[0] == 404
    assert store.request("PUT", "/b/w.json", b"again", {"If-None-Match": "*"})[0] == 200  # gone: created anew
    assert store.request("POST", "/b/w.json?uploads")[0] in (405, 501)  # what it does not do, it says


def test_listings_page_with_prefix_and_delimiter(store: Store) -> None:
    keys = [f"p/{i:04d}.batch" for i in range(2500)] + ["p/sub/a", "p/sub/b", "q/x"]
    for key in keys:
        assert store.request("PUT", f"/b/{key}", b"x")[0] == 200
    listed, token = [], None
    while True:
        found, _, root = store.keys("p/", **({"continuation_token": token} if token else {}))
        listed += found
        if root.findtext(f"{NS}IsTruncated") != "true":
            break
        assert len(found) == 1000
        token = root.findtext(f"{NS}NextContinuationToken")
    assert listed == sorted(k for k in keys if k.startswith("p/"))
    found, prefixes, root = store.keys("p/", delimiter="/", max_keys="3000")  # S3 gives at most 1,000
    assert len(found) == 1000 and root.findtext(f"{NS}IsTruncated") == "true"
    found, prefixes, _ = store.keys("p/", delimiter="/", start_after="p/1999.batch")
    assert found == [k for k in keys if re.fullmatch(r"p/2\d+\.batch", k)] and prefixes == ["p/sub/"]
    assert store.keys("p/", start_after="p/2498.batch")[0] == ["p/2499.batch", "p/sub/a", "p/sub/b"]
    found, prefixes, root = store.keys("p/", delimiter="/", start_after="p/2499.batch", max_keys="1")
    assert (found, prefixes, root.findtext(f"{NS}IsTruncated")) == ([], ["p/sub/"], "false")
    assert store.request("GET", "/b?list-type=2&continuation-token=%%%")[0] == 400
    status, _, body = store.request("POST", "/b?delete", b"<Delete><Object><Key>p/sub/a</Key></Object><Object><Key>"
                                    b"q/x</Key></Object><Quiet>true</Quiet></Delete>")
    assert status == 200, body
    assert store.keys("p/sub/")[0] == ["p/sub/b"] and store.keys("q/")[0] == []
    assert store.request("DELETE", "/nobucket")[0] == 404


def test_a_common_prefix_over_many_pages_is_listed_once(store: Store) -> None:
    for i in range(1001):
        assert store.request("PUT", f"/b/h/a/{i:05d}", b"x")[0] == 200
    assert store.request("PUT", "/b/h/z", b"x")[0] == 200
    found, prefixes, root = store.keys("h/", delimiter="/")
    assert (found, prefixes, root.findtext(f"{NS}IsTruncated")) == (["h/z"], ["h/a/"], "false")
    found, prefixes, root = store.keys("h/", delimiter="/", max_keys="1")
    assert (found, prefixes, root.findtext(f"{NS}IsTruncated")) == ([], ["h/a/"], "true")
    token = root.findtext(f"{NS}NextContinuationToken")
    assert store.keys("h/", delimiter="/", continuation_token=token)[:2] == (["h/z"], [])


def test_a_late_batch_merged_into_the_first_leaves_it_the_oldest(store: Store) -> None:
    """A batch whose write arrives after later ones were merged: the merge must not make the partition's first
    key look newer than the ones after it (Tansu would report a later earliest offset)."""
    def put(offset: int) -> None:
        key = f"{PARTITION}{offset:020d}.batch"
        assert store.request("PUT", f"/b/{key}", build([(offset, b"k", b"v", [])]))[0] == 200

    for offset in [*range(10), *range(11, 45), 10, *range(45, 80)]:
        put(offset)
    contents = list(store.keys(PARTITION)[2].iter(f"{NS}Contents"))
    times = [e.findtext(f"{NS}LastModified") for e in contents]
    assert contents[0].findtext(f"{NS}Key", "").endswith(f"{0:020d}.batch") and times[0] == min(times)


def test_an_answered_write_survives_kill_9(store: Store) -> None:
    for i in range(200):
        assert store.request("PUT", f"/b/k/{i:03d}", f"v{i}".encode(), {"If-None-Match": "*"})[0] == 200
    store.kill()  # right after the last answer
    store.start()
    assert store.keys("k/")[0] == [f"k/{i:03d}" for i in range(200)]
    assert store.request("GET", "/b/k/199")[2] == b"v199"
    assert store.request("PUT", "/b/k/199", b"x", {"If-None-Match": "*"})[0] == 412  # still there for conditions


def test_small_batches_merge_and_every_record_stays_readable(store: Store) -> None:
    offset, expected, keys = 0, [], []
    for i in range(100):
        records = [(1_000_000 + i * 10 + j, f"k{i}".encode(), f"value {i}.{j}".encode(), [("h", b"x")])
                   for j in range(1 + i % 3)]
        key = f"{PARTITION}{offset:020d}.batch"
        assert store.request("PUT", f"/b/{key}", build(records), {"If-None-Match": "*"})[0] == 200
        expected += [(offset + j, *record) for j, record in enumerate(records)]
        keys.append(key)
        offset += len(records)
    listed = store.keys(PARTITION)[0]
    assert len(listed) < 40, listed  # merged: not one key per batch
    assert listed[-1] == keys[-1]  # the newest batch keeps its own key
    read = []
    for key in listed:
        status, _, body = store.request("GET", f"/b/{key}")
        batch = DefaultRecordBatch(bytearray(body))
        assert status == 200 and batch.validate_crc()
        base = int(key[-26:-6])  # as Tansu reads it: the key gives the base offset
        read += [(base + r.offset - batch.base_offset, r.timestamp, r.key, r.value, r.headers) for r in batch]
    assert read == expected
    # A fetch that listed a merged-away key must fail and be made again, never read it beside the merged batch
    # (the client would take its records twice).
    merged_away = sorted(set(keys) - set(listed))
    assert merged_away and all(store.request("GET", f"/b/{key}")[0] == 404 for key in merged_away)
    times = [e.findtext(f"{NS}LastModified") for e in store.keys(PARTITION)[2].iter(f"{NS}Contents")]
    assert times == sorted(times)  # the earliest offset is the least recently modified key's, the latest the most
    store.kill()
    store.start()
    assert store.keys(PARTITION)[0] == listed


def test_other_batches_are_kept_as_they_are(store: Store) -> None:
    bodies = [build([(1, b"k", b"v", [])], compression=0 if i % 2 else 1) for i in range(40)]
    for i, body in enumerate(bodies):
        assert store.request("PUT", f"/b/{PARTITION}{i:020d}.batch", body)[0] == 200
    assert store.request("PUT", f"/b/{PARTITION}{40:020d}.batch", b"not a batch")[0] == 200
    for i in range(41, 80):
        assert store.request("PUT", f"/b/{PARTITION}{i:020d}.batch", bodies[1])[0] == 200
    listed = store.keys(PARTITION)[0]
    assert all(f"{PARTITION}{i:020d}.batch" in listed for i in range(0, 41, 2))  # compressed, and the odd one
    assert store.request("GET", f"/b/{PARTITION}{40:020d}.batch")[2] == b"not a batch"
    assert len(listed) < 79


def test_the_store_stops_cleanly_on_sigterm(store: Store) -> None:
    assert store.request("PUT", "/b/x", b"1")[0] == 200
    assert store.process is not None
    store.process.send_signal(signal.SIGTERM)
    assert store.process.wait(10) == 0
    assert not [p for p in os.listdir(store.directory) if p.endswith("-wal") and os.path.getsize(store.directory / p)]


def test_a_body_it_will_not_read_is_refused_and_the_connection_closed(store: Store) -> None:
    with socket.create_connection(("127.0.0.1", store.port), timeout=10) as sock:
        sock.sendall(b"PUT /b/big HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # the store closes the connection after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ") and b"EntityTooLarge" in answer
    with socket.create_connection(("127.0.0.1", store.port), timeout=10) as sock:
        sock.sendall(b"not http\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    assert store.request("GET", "/b/big")[0] == 404  # nothing stored, and the store still serves
