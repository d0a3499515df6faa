"""``schemathesis`` against a real ``runledger serve``'s ``/openapi.json``, every request signed: no 5xx, and every
response as the document declares it (status code, content type, headers, body schema), over more than 1,000
generated requests, valid and invalid ones, with a fixed seed."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.httpapi.serving import Served, migrated, serving, signed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 80, GenerationMode.NEGATIVE: 60}
"""Per operation and mode: 18 operations; those with few distinct requests (``/healthz``) end sooner."""


class Signer(requests.auth.AuthBase):
    """Signs the request as it is sent (its final body) per Standard Webhooks, as the source ``source_id``."""

    def __init__(self, secret: str, source_id: str) -> None:
        self.secret, self.source_id = secret, source_id

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = r.body if isinstance(r.body, bytes) else (r.body or "").encode()
        r.headers.update(signed(self.secret, self.source_id, body, at=datetime.now(UTC)))
        return r


def _add_source(served: Served) -> str:
    done = served.run("sources", "add", "fuzz", "--source", "/producers/fuzz", "--append-prefix", "",
                      "--read-prefix", "", "--rate", "1000000", "--burst", "1000000", "--json")
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["secret"])


async def test_generated_requests_get_no_5xx_and_only_documented_answers(env: dict[str, str]) -> None:
    env = await migrated(env)
    async with serving(env, RUNLEDGER_PRODUCER_WAIT_S="5") as served:
        secret = _add_source(served)
        sent = await asyncio.to_thread(_fuzz, served.url, Signer(secret, "fuzz"))
    assert sum(sent.values()) >= 1000, sent


def _fuzz(url: str, signer: Signer) -> dict[str, int]:
    """Every operation of the served document, in each generation mode; the requests sent per operation."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    session = requests.Session()
    session.auth = signer
    sent: dict[str, int] = {}
    failures: list[str] = []
    statuses: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, examples in EXAMPLES.items():
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                response = case.call(base_url=url, session=session, timeout=30)
                sent[case.operation.label] = sent.get(case.operation.label, 0) + 1
                key = f"{case.operation.label} {response.status_code}"
                statuses[key] = statuses.get(key, 0) + 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except AssertionError as e:  # every failure collected, so that one run shows them all
                    failures.append(f"{case.operation.label}: {response.status_code} {response.text[:300]!r}: "
                                    f"{str(e)[:1500]}")

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body): the positive run covers it
                assert mode is GenerationMode.NEGATIVE, operation.label
    assert not failures, "\n\n".join(failures[:40]) + f"\n\n{len(failures)} failures; sent {sent}"
    print(json.dumps(statuses, indent=1, sort_keys=True))  # noqa: T201 - shown with -s, and when the test fails
    return sent
