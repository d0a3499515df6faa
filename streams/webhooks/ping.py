"""A signed ``runledger.webhook.ping`` to an endpoint, now: ``runledger webhooks ping`` and ``POST
/v1/webhooks/{id}/ping``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from runledger.streams.settings import Settings
from runledger.streams.webhooks.sender import Attempt, post, signature_header
from runledger.streams.webhooks.targets import parse_target

__all__ = ["ping"]


async def ping(endpoint_id: str, url: str, secrets: Sequence[str], settings: Settings, *,
               timeout_s: float) -> dict[str, Any]:
    """POST a ping signed with ``secrets`` to ``url``; what it answered. Raises TargetRefused for a URL or an
    address that may not be reached."""
    body = orjson.dumps({"specversion": "1.0", "id": str(uuid.uuid4()), "source": "runledger",
                         "type": "runledger.webhook.ping", "subject": endpoint_id,
                         "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                         "datacontenttype": "application/json", "data": {"endpoint_id": endpoint_id}})
    msg_id, stamp = f"msg_{uuid.uuid4().hex}", int(time.time())
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(stamp),
               "webhook-signature": signature_header(secrets, msg_id, stamp, body)}
    allow = settings.webhook_allow_private
    target = parse_target(url, allow_private=allow)
    try:
        attempt = await post(target, body, headers, allow_private=allow,
                             connect_timeout_s=settings.webhook_connect_timeout_s, timeout_s=timeout_s)
    except OSError as e:  # the name did not resolve
        attempt = Attempt(None, 0.0, error=f"cannot resolve {target.host}: {e}")
    return {"endpoint_id": endpoint_id, "webhook_id": msg_id, "ok": attempt.ok, "status": attempt.status,
            "seconds": round(attempt.seconds, 3), "address": attempt.address, "error": attempt.error,
            "response": attempt.response.decode("utf-8", "replace")}
