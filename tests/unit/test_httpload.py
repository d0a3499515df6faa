"""The bench's load client signs as a producer signs: its headers verify with the standardwebhooks package."""

from __future__ import annotations

import base64
import os

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from runledger.streams.dev.httpload import SignedRequests


def test_the_load_clients_signature_verifies_with_the_standardwebhooks_package() -> None:
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    body = b'{"type": "step.started", "data": {}}'
    lines = SignedRequests("fleet", secret).headers(body).decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines if line)
    assert headers["runledger-source"] == "fleet"
    Webhook(secret).verify(body, headers)  # raises if it does not verify
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(os.urandom(32)).decode()).verify(body, headers)
