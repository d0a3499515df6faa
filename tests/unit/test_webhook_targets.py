"""Where a webhook may be delivered, without I/O: https to public addresses only, unless allowed for development."""

from __future__ import annotations

import ipaddress

import pytest

from runledger.streams.webhooks.targets import TargetRefused, check_address, check_addresses, parse_target

REFUSED = [
    "127.0.0.1", "127.9.9.9", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1", "100.64.0.1",
    "0.0.0.0", "::", "224.0.0.1", "ff02::1", "fe80::1", "fc00::1", "240.0.0.1", "255.255.255.255",
    "169.254.169.254", "fd00:ec2::254", "100.100.100.200",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1",  # IPv4-mapped
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_and_metadata_addresses_are_refused(address: str) -> None:
    with pytest.raises(TargetRefused, match="address"):
        check_address(ipaddress.ip_address(address), allow_private=False)
    check_address(ipaddress.ip_address(address), allow_private=True)  # development and tests


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "8.8.8.8",
                                     "64:ff9b::808:808"])  # NAT64 of 8.8.8.8
def test_public_addresses_pass(address: str) -> None:
    check_address(ipaddress.ip_address(address), allow_private=False)


def test_one_refused_address_among_those_resolved_refuses_the_host() -> None:
    public, private = ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.0.0.1")
    assert check_addresses([public], allow_private=False) == [public]
    with pytest.raises(TargetRefused):
        check_addresses([public, private], allow_private=False)
    with pytest.raises(TargetRefused, match="no address"):
        check_addresses([], allow_private=False)


def test_urls_https_only_without_credentials_and_literal_hosts_checked_at_once() -> None:
    target = parse_target("https://Hooks.Example.com:8443/in?x=1", allow_private=False)
    assert (target.scheme, target.host, target.port, target.path) == ("https", "hooks.example.com", 8443, "/in?x=1")
    assert parse_target("https://hooks.example.com", allow_private=False).port == 443
    for url, why in [("http://hooks.example.com/", "scheme"), ("ftp://x/", "scheme"), ("hooks.example.com", "scheme"),
                     ("https://user:pw@hooks.example.com/", "user"), ("https:///path", "no host"),
                     ("https://hooks.example.com/#f", "fragment"), ("https://127.0.0.1/", "loopback"),
                     ("https://[::1]:8443/", "loopback"), ("https://localhost/", "loopback"),
                     ("https://a.localhost/", "loopback"), ("https://10.0.0.1/", "private"),
                     ("https://169.254.169.254/latest", "metadata"), ("https://x:99999/", "URL"),
                     ("https://hooks.example.com/a b", "whitespace"), ("https://x/" + "a" * 2000, "2,000")]:
        with pytest.raises(TargetRefused, match=why):
            parse_target(url, allow_private=False)
    local = parse_target("http://127.0.0.1:8080/hook", allow_private=True)
    assert (local.scheme, local.literal, local.port) == ("http", ipaddress.ip_address("127.0.0.1"), 8080)
