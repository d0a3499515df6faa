"""The log store's HTTP side: the subset of the S3 API that Tansu's S3 engine (Rust ``object_store``) calls.

``python -m runledger.streams.dev.s3server --dir DIR --port PORT [--bucket NAME]`` serves, path-style, on
loopback: PutObject (``If-Match``, ``If-None-Match``), GetObject and HeadObject (``If-Match``,
``If-None-Match``, ``If-Modified-Since``, ``If-Unmodified-Since``, one ``Range``), DeleteObject,
DeleteObjects, ListObjectsV2 (``prefix``, ``delimiter``, ``max-keys``, ``start-after``,
``continuation-token``), CreateBucket, HeadBucket, DeleteBucket. Anything else is answered 501
``NotImplemented``. Requests are not authenticated: it listens on loopback only, for the embedded broker.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import email.utils
import functools
import itertools
import logging
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from runledger.streams.dev.logstore import ObjectInfo, ObjectStore, PreconditionFailed, StoreError, etag_matches

__all__ = ["main", "serve"]

log = logging.getLogger(__name__)
_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
_MAX_BODY = 64 * 1024 * 1024
_IDS = itertools.count(1)  # request ids, as S3 gives each answer
_REASONS = {200: "OK", 204: "No Content", 206: "Partial Content", 304: "Not Modified", 400: "Bad Request",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 412: "Precondition Failed",
            413: "Payload Too Large", 416: "Range Not Satisfiable", 500: "Internal Server Error",
            501: "Not Implemented"}

Response = tuple[int, dict[str, str], bytes]


class _Refused(StoreError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _iso(mtime_us: int) -> str:
    return datetime.fromtimestamp(mtime_us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _http_date(mtime_us: int) -> str:
    return email.utils.formatdate(mtime_us / 1e6, usegmt=True)


def _xml(body: str) -> tuple[dict[str, str], bytes]:
    return {"Content-Type": "application/xml"}, f'<?xml version="1.0" encoding="UTF-8"?>\n{body}'.encode()


def _error(status: int, code: str, message: str, resource: str) -> Response:
    headers, body = _xml(f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
                         f"<Resource>{escape(resource)}</Resource></Error>")
    return status, headers, body


def _object_headers(info: ObjectInfo) -> dict[str, str]:
    return {"ETag": info.etag, "Last-Modified": _http_date(info.mtime_us),
            "Content-Type": info.content_type or "application/octet-stream", "Accept-Ranges": "bytes"}


class S3App:
    """Maps requests onto an ``ObjectStore``."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def __call__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        split = urlsplit(target)
        bucket, _, key = unquote(split.path).lstrip("/").partition("/")
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        try:
            if not bucket:
                raise _Refused(501, "NotImplemented", "ListBuckets is not implemented")
            if key:
                return self._object(method, bucket, key, headers, body)
            return self._bucket(method, bucket, query, body)
        except StoreError as refused:
            return _error(refused.status, refused.code, str(refused) or refused.code, split.path)

    def _object(self, method: str, bucket: str, key: str, headers: dict[str, str], body: bytes) -> Response:
        if method == "PUT":
            if "x-amz-copy-source" in headers:
                raise _Refused(501, "NotImplemented", "CopyObject is not implemented")
            info = self.store.put(bucket, key, body, content_type=headers.get("content-type"),
                                        if_match=headers.get("if-match"), if_none_match=headers.get("if-none-match"))
            return 200, {"ETag": info.etag}, b""
        if method in ("GET", "HEAD"):
            info = self.store.get(bucket, key, body=method == "GET")
            answer = _object_headers(info)
            if (condition := _failed_condition(info, headers)) is not None:
                if condition == 304:
                    return 304, {"ETag": info.etag, "Last-Modified": answer["Last-Modified"]}, b""
                raise PreconditionFailed(key)
            if method == "HEAD":
                return 200, {**answer, "Content-Length": str(info.size)}, b""
            data = info.body or b""
            if "range" in headers:
                first, last = _range(headers["range"], len(data))
                return 206, {**answer, "Content-Range": f"bytes {first}-{last}/{len(data)}"}, data[first:last + 1]
            return 200, answer, data
        if method == "DELETE":
            self.store.delete(bucket, [key])
            return 204, {}, b""
        raise _Refused(405, "MethodNotAllowed", f"{method} on an object")

    def _bucket(self, method: str, bucket: str, query: dict[str, str], body: bytes) -> Response:
        if method == "PUT" and not query:
            self.store.create_bucket(bucket)
            return 200, {"Location": f"/{bucket}"}, b""
        if method == "HEAD":
            if not self.store.bucket_exists(bucket):
                return 404, {}, b""
            return 200, {}, b""
        if method == "DELETE" and not query:
            self.store.delete_bucket(bucket)
            return 204, {}, b""
        if method == "POST" and "delete" in query:
            return self._delete_objects(bucket, body)
        if method == "GET" and query.get("list-type") == "2":
            return self._list(bucket, query)
        raise _Refused(501, "NotImplemented", f"{method} on a bucket with {sorted(query)}")

    def _delete_objects(self, bucket: str, body: bytes) -> Response:
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError as bad:
            raise _Refused(400, "MalformedXML", str(bad)) from None
        keys = [element.text or "" for element in root.iter() if element.tag.rpartition("}")[2] == "Key"]
        quiet = any((e.text or "").strip() == "true" for e in root.iter() if e.tag.rpartition("}")[2] == "Quiet")
        self.store.delete(bucket, keys)
        deleted = "" if quiet else "".join(f"<Deleted><Key>{escape(key)}</Key></Deleted>" for key in keys)
        headers, answer = _xml(f'<DeleteResult xmlns="{_XMLNS}">{deleted}</DeleteResult>')
        return 200, headers, answer

    def _list(self, bucket: str, query: dict[str, str]) -> Response:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        try:
            limit = max(0, min(int(query.get("max-keys", "1000")), 1000))
        except ValueError:
            raise _Refused(400, "InvalidArgument", "max-keys must be an integer") from None
        token = query.get("continuation-token")
        try:
            after = (base64.b64decode(token, altchars=b"-_", validate=True).decode() if token
                     else query.get("start-after", ""))
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            raise _Refused(400, "InvalidArgument", "the continuation token is not one this store gave") from None
        encode = (lambda text: quote(text, safe="/")) if query.get("encoding-type") == "url" else (lambda t: t)
        contents, prefixes, last, truncated = self._entries(bucket, prefix, delimiter, after, limit)
        parts = [f'<ListBucketResult xmlns="{_XMLNS}"><Name>{escape(bucket)}</Name>',
                 f"<Prefix>{escape(encode(prefix))}</Prefix><KeyCount>{len(contents) + len(prefixes)}</KeyCount>",
                 f"<MaxKeys>{limit}</MaxKeys><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if delimiter:
            parts.append(f"<Delimiter>{escape(encode(delimiter))}</Delimiter>")
        if token:
            parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
        if truncated:
            parts.append(f"<NextContinuationToken>{base64.urlsafe_b64encode(last.encode()).decode()}"
                         "</NextContinuationToken>")
        url = query.get("encoding-type") == "url"
        parts.extend(_contents(i.key, i.etag, i.size, i.mtime_us, url) for i in contents)
        parts.extend(f"<CommonPrefixes><Prefix>{escape(encode(p))}</Prefix></CommonPrefixes>" for p in prefixes)
        parts.append("</ListBucketResult>")
        headers, answer = _xml("".join(parts))
        return 200, headers, answer


    def _entries(self, bucket: str, prefix: str, delimiter: str, after: str,
                 limit: int) -> tuple[list[ObjectInfo], list[str], str, bool]:
        """Up to ``limit`` objects and common prefixes after ``after``: (objects, prefixes, the last key or prefix
        given, whether more follow)."""
        if limit == 0:
            return [], [], after, False
        if not delimiter:
            page = self.store.listing(bucket, prefix, after, limit + 1)
            return page[:limit], [], page[limit - 1].key if len(page) > limit else after, len(page) > limit
        contents: list[ObjectInfo] = []
        prefixes: list[str] = []
        last = after
        while True:
            page = self.store.listing(bucket, prefix, last, 1000)
            for info in page:
                if len(contents) + len(prefixes) == limit:
                    return contents, prefixes, last, True
                cut = info.key.find(delimiter, len(prefix))
                if cut < 0:
                    contents.append(info)
                    last = info.key
                    continue
                prefixes.append(info.key[:cut + len(delimiter)])
                last = prefixes[-1] + "\U0010ffff"  # past every key under it: list again from there
                break
            else:
                if len(page) < 1000:
                    return contents, prefixes, last, False


@functools.lru_cache(maxsize=1 << 17)
def _contents(key: str, etag: str, size: int, mtime_us: int, url: bool) -> str:
    """One object of a listing, as XML: kept, since Tansu lists every key of a partition on every fetch."""
    shown = quote(key, safe="/") if url else key
    return (f"<Contents><Key>{escape(shown)}</Key><LastModified>{_iso(mtime_us)}</LastModified>"
            f"<ETag>{escape(etag)}</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass></Contents>")


def _failed_condition(info: ObjectInfo, headers: dict[str, str]) -> int | None:
    """The status a conditional read fails with (RFC 9110 section 13.2.2 order), or None."""
    match = headers.get("if-match")
    if match is not None and not (match.strip() == "*" or etag_matches(info.etag, match)):
        return 412
    if "if-match" not in headers and "if-unmodified-since" in headers:
        since = _parse_date(headers["if-unmodified-since"])
        if since is not None and info.mtime_us // 1_000_000 > since:
            return 412
    if "if-none-match" in headers:
        if headers["if-none-match"].strip() == "*" or etag_matches(info.etag, headers["if-none-match"]):
            return 304
    elif "if-modified-since" in headers:
        since = _parse_date(headers["if-modified-since"])
        if since is not None and info.mtime_us // 1_000_000 <= since:
            return 304
    return None


def _parse_date(value: str) -> int | None:
    try:
        return int(email.utils.parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError):
        return None


def _range(header: str, size: int) -> tuple[int, int]:
    """The first and last byte of a single ``bytes=`` range, or 416."""
    unit, _, spec = header.partition("=")
    first_text, _, last_text = spec.strip().partition("-")
    try:
        if unit.strip() != "bytes" or "," in spec:
            raise ValueError
        if not first_text:  # the last N bytes
            first, last = max(0, size - int(last_text)), size - 1
        else:
            first, last = int(first_text), min(int(last_text), size - 1) if last_text else size - 1
    except ValueError:
        raise _Refused(416, "InvalidRange", f"range {header!r} is not supported") from None
    if first >= size or first > last:
        raise _Refused(416, "InvalidRange", f"range {header!r} is outside the object's {size} bytes")
    return first, last


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
            if sum(map(len, chunks)) > _MAX_BODY:
                raise _Refused(413, "EntityTooLarge", "the body is more than this store takes")
    length = int(headers.get("content-length", "0"))
    if length > _MAX_BODY:
        raise _Refused(413, "EntityTooLarge", f"{length} bytes is more than this store takes")
    return await reader.readexactly(length) if length else b""


async def _serve_connection(app: S3App, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            request_line, *lines = head.decode("latin-1").split("\r\n")
            try:
                method, target, version = request_line.split(" ", 2)
            except ValueError:  # not HTTP: answered once, then the connection is closed
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            headers = {}
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            try:
                body = await _read_body(reader, headers)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return  # the client went away mid-body: nothing to answer
            except (StoreError, ValueError) as bad:  # a body not read whole: nothing more can be read after it
                body, close = None, True
                refused = bad if isinstance(bad, StoreError) else _Refused(400, "InvalidRequest", str(bad))
                status, answer, data = _error(refused.status, refused.code, str(refused), target)
            if body is not None:
                try:
                    status, answer, data = app(method, target, headers, body)
                except StoreError as refused:
                    status, answer, data = _error(refused.status, refused.code, str(refused), target)
                except Exception as failed:  # noqa: BLE001 - answered, logged; the connection goes on
                    log.exception("%s %s failed", method, target)
                    status, answer, data = _error(500, "InternalError", repr(failed), target)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s %s %s", method, target, {k: v for k, v in headers.items() if k.startswith("if")},
                          status)
            lines_out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"x-amz-request-id: {next(_IDS):x}",
                         f"Date: {email.utils.formatdate(usegmt=True)}"]
            if "Content-Length" not in answer:
                lines_out.append(f"Content-Length: {0 if method == 'HEAD' or status == 304 else len(data)}")
            lines_out.extend(f"{name}: {value}" for name, value in answer.items())
            if close:
                lines_out.append("Connection: close")
            writer.write(("\r\n".join(lines_out) + "\r\n\r\n").encode("latin-1"))
            if method != "HEAD" and status != 304:
                writer.write(data)
            await writer.drain()
            if method == "PUT":  # after the answer: merging is not on the writer's path
                app.store.merge_due()
            if close:
                return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(directory: Path, host: str, port: int, buckets: list[str], *, fsync: bool = False) -> None:
    """Serve the store kept in ``directory`` until SIGTERM or SIGINT (every write answered is committed)."""
    directory.mkdir(parents=True, exist_ok=True)
    store = ObjectStore(directory / "objects.sqlite3", fsync=fsync)
    try:
        for bucket in buckets:
            store.create_bucket(bucket)
        app = S3App(store)
        server = await asyncio.start_server(lambda r, w: _serve_connection(app, r, w), host, port,
                                            limit=64 * 1024)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()  # every write answered is committed: the open connections are not waited for
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runledger.streams.dev.s3server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="where the SQLite file lives (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--bucket", action="append", default=[], help="a bucket to create if missing (repeatable)")
    parser.add_argument("--fsync", action="store_true", help="sync every write to disk before answering it (by "
                        "default a write is answered once in the page cache: it survives a kill -9 of any process, "
                        "not a power loss)")
    args = parser.parse_args(argv)
    debug = os.environ.get("RUNLEDGER_LOGSTORE_DEBUG")  # every request, for debugging Tansu against the store
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.dir, args.host, args.port, args.bucket, fsync=args.fsync))


if __name__ == "__main__":
    main()
