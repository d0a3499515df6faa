"""Errors as RFC 9457 problem documents (``application/problem+json``), naming every failed field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["PROBLEM_TYPE", "FieldProblem", "Problem", "problem_response"]

PROBLEM_TYPE = "https://runledger.dev/problems/"
"""A problem's ``type`` is this followed by its ``code`` (``…/problems/invalid_event``); docs/http.md lists them."""

FieldProblem = Mapping[str, str]
"""One failed field: ``{"field": "data.workflow", "reason": "must be 1 to 200 characters"}``, plus ``index``
(the event's position in a batch) where there is one."""


class Problem(Exception):  # noqa: N818 - it is the RFC's word
    """An HTTP error answered as a problem document. ``code`` is a stable machine-readable name."""

    def __init__(self, status: int, code: str, detail: str, *, title: str | None = None,
                 errors: Sequence[Mapping[str, Any]] = (), headers: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        """``extra``: extension members of the document (RFC 9457 section 3.2), e.g. a stream's ``seq``."""
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.title = title or code.replace("_", " ")
        self.errors = list(errors)
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def document(self, instance: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {**self.extra, "type": PROBLEM_TYPE + self.code, "title": self.title,
                               "status": self.status, "detail": self.detail, "code": self.code}
        if instance is not None:
            doc["instance"] = instance
        if self.errors:
            doc["errors"] = self.errors
        return doc


async def problem_response(request: Request, exc: Exception) -> Response:
    """The exception handler for ``Problem``: its document, status and headers."""
    assert isinstance(exc, Problem)
    return Response(orjson.dumps(exc.document(request.url.path)), status_code=exc.status,
                    headers=exc.headers, media_type="application/problem+json")
