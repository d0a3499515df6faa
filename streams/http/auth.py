"""Request authentication (Standard Webhooks signatures) and the sources credentials belong to."""

from __future__ import annotations

from starlette.requests import Request

from runledger.streams.http.caller import Caller

__all__ = ["caller"]


async def caller(request: Request) -> Caller:
    """The FastAPI dependency: the verified caller of ``request``, or a 401 ``Problem``."""
    raise NotImplementedError("to be built: issue 24")
