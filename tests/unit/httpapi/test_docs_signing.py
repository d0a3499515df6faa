"""docs/http.md's `curl` and `openssl` signing, run as a producer would copy it: its signature is the one the
standardwebhooks package makes (so the server accepts it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from runledger.streams.http.keys import new_credential

DOC = Path(__file__).parents[3] / "docs" / "http.md"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
@pytest.mark.parametrize("body", ['{"type":"execution.started","data":{"workflow":"triage"}}', ""])
def test_the_documented_openssl_signature_is_the_standard_one(body: str) -> None:
    [block] = re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)
    signing = block[block.index('id="msg_'):block.index("curl ")]  # the lines that compute id, ts and sig
    secret = new_credential("v1").kept
    script = f"secret='{secret}'\nbody='{body}'\n{signing}\nprintf '%s\\n%s\\n%s\\n' \"$id\" \"$ts\" \"$sig\"\n"
    msg_id, ts, sig = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                                     timeout=30).stdout.split("\n")[:3]
    expected = Webhook(secret).sign(msg_id, datetime.fromtimestamp(int(ts), UTC), body.encode())
    assert f"v1,{sig}" == expected
