"""Where a webhook may be delivered: an ``https`` URL whose host resolves to public addresses only.

A subscription's URL is checked when it is added and again at every delivery, against the addresses its host
resolves to then; the delivery connects to an address that was checked (no second lookup, so a DNS answer that
changes between the check and the connection cannot point it elsewhere). Refused: loopback, private, link-local,
shared (CGNAT), multicast, reserved and unspecified addresses, IPv4 addresses hidden in IPv6 (mapped, 6to4, NAT64,
Teredo), and the cloud metadata addresses. ``allow_private`` (``RUNLEDGER_WEBHOOK_ALLOW_PRIVATE``, for development
and tests) lets ``http`` and any address through.

Pure logic: resolving the host is the caller's (``Target.addresses``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from runledger.schemas.errors import PermanentError

__all__ = ["METADATA_ADDRESSES", "Target", "TargetRefused", "check_address", "check_addresses", "parse_target"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
    "169.254.170.2",  # AWS ECS task metadata
    "100.100.100.200",  # Alibaba Cloud
    "fd00:ec2::254",  # AWS over IPv6
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class TargetRefused(PermanentError):
    """A webhook URL, or an address its host resolves to, that runledger does not deliver to; the message says
    why and names the setting that allows it in development."""

    code = "webhook_target_refused"


@dataclass(frozen=True, slots=True)
class Target:
    """A checked webhook URL: its scheme, host (lowercase; an IP literal unbracketed), port and path with query."""

    url: str
    scheme: str
    host: str
    port: int
    path: str

    @property
    def literal(self) -> IPAddress | None:
        """The host as an IP address, if it is one (then it is not resolved)."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None


def parse_target(url: str, *, allow_private: bool) -> Target:
    """``url`` checked as a webhook target (its addresses are checked once resolved: ``check_address``). Raises
    TargetRefused naming what is wrong."""
    if len(url) > 2000:
        raise TargetRefused("the URL is over 2,000 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise TargetRefused(f"not a URL: {e}") from e
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise TargetRefused(f"the URL's scheme must be {' or '.join(schemes)}, not {parts.scheme or 'none'!r}"
                            + ("" if allow_private else " (RUNLEDGER_WEBHOOK_ALLOW_PRIVATE=true allows http, for "
                                                        "development)"))
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("the URL must not carry a user or password: the deliveries are signed instead")
    if parts.fragment:
        raise TargetRefused("the URL must not have a #fragment")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise TargetRefused("the URL has no host")
    if any(c.isspace() or ord(c) < 0x21 for c in url):
        raise TargetRefused("the URL holds whitespace or control characters")
    target = Target(url, parts.scheme, host.lower(), port or (443 if parts.scheme == "https" else 80),
                    (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    if target.literal is not None:
        check_address(target.literal, allow_private=allow_private)
    elif host.lower() == "localhost" or host.lower().endswith(".localhost"):
        check_address(ipaddress.ip_address("127.0.0.1"), allow_private=allow_private)
    return target


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo's client, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def check_address(address: IPAddress, *, allow_private: bool) -> None:
    """Raise TargetRefused unless ``address`` is one a webhook may be delivered to."""
    if allow_private:
        return
    inner = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    for candidate in (address, inner):
        if candidate is None:
            continue
        if candidate in METADATA_ADDRESSES:
            raise TargetRefused(f"{address} is a cloud metadata address")
        if not candidate.is_global or candidate.is_multicast:
            kind = ("loopback" if candidate.is_loopback else "link-local" if candidate.is_link_local else
                    "multicast" if candidate.is_multicast else "unspecified" if candidate.is_unspecified else
                    "private" if candidate.is_private else "reserved or shared")
            raise TargetRefused(f"{address} is a {kind} address: webhooks go to public addresses only "
                                "(RUNLEDGER_WEBHOOK_ALLOW_PRIVATE=true allows others, for development and tests)")


def check_addresses(addresses: Iterable[IPAddress], *, allow_private: bool) -> list[IPAddress]:
    """Every address checked (any refused: TargetRefused); the list, in order. Raises TargetRefused if empty."""
    checked = list(addresses)
    if not checked:
        raise TargetRefused("the host resolves to no address")
    for address in checked:
        check_address(address, allow_private=allow_private)
    return checked
