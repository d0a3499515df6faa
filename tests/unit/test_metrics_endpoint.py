"""The metrics endpoint: a taken port moves to the next, an address that cannot be used is an error."""

from __future__ import annotations

import errno
import socket
import urllib.request

import pytest

from runledger.streams.metrics import serve
from tests.conftest import free_ports


def test_a_taken_port_moves_to_the_next_and_a_bad_address_fails() -> None:
    (port,) = free_ports(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        served = serve("127.0.0.1", port)
    assert served > port
    with urllib.request.urlopen(f"http://127.0.0.1:{served}/metrics", timeout=10) as answer:
        assert b"runledger_appends_total" in answer.read()
    with pytest.raises(OSError) as refused:
        serve("192.0.2.1", port)  # TEST-NET-1: no interface has it
    assert refused.value.errno == errno.EADDRNOTAVAIL
