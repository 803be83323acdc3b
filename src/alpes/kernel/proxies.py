"""Who is calling: the client's address behind trusted reverse proxies (pure, no framework).

`X-Forwarded-For` and `X-Forwarded-Proto` are plain request headers: anyone can send them. They
say something only when the TCP peer is one of our own proxies (ALPES_TRUSTED_PROXIES, addresses
or CIDR networks; none by default). Then the client is the right-most hop of X-Forwarded-For that
is not itself a trusted proxy: every proxy appends the peer it saw, so hops to its left were
written by whoever called it and may be anything. Every address handed on is a parsed
`ipaddress` value, never the raw header text.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: str | Iterable[str] | None) -> tuple[IPNetwork, ...]:
    """`"10.0.0.1, 10.1.0.0/16, fd00::/8"` → networks. ValueError names the bad item."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    networks = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def parse_ip(text: str | None) -> IPAddress | None:
    """An address as a proxy or a socket writes it (`1.2.3.4`, `1.2.3.4:5678`, `[::1]:80`, `::1`),
    IPv4-mapped IPv6 unwrapped; None for anything else."""
    if not text:
        return None
    text = text.strip()
    if len(text) > 64:
        return None
    candidates = [text]
    if text.startswith("[") and "]" in text:
        candidates = [text[1:text.index("]")]]
    elif text.count(":") == 1:  # IPv4 with a port
        candidates.append(text.split(":", 1)[0])
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            return None  # a zone index (fe80::1%eth0) is not an address of the internet
        return address
    return None


# The address a request came from, parsed once while it is among the recent ones: each request asks
# two or three times (rate limits, the click, velocity), and a client's requests repeat it. Safe to
# share: an address object is immutable.
client_ip = functools.lru_cache(maxsize=4096)(parse_ip)


def is_trusted(address: IPAddress | None, trusted: tuple[IPNetwork, ...]) -> bool:
    return address is not None and any(address.version == n.version and address in n for n in trusted)


def forwarded_client(forwarded_for: str, trusted: tuple[IPNetwork, ...]) -> IPAddress | None:
    """The client named by X-Forwarded-For as a trusted proxy passed it on: the right-most hop
    that is not a trusted proxy. A hop that is not an address stops the walk (what lies left of
    it was never checked by us): the nearest trusted hop is then the best known. None when even
    the right-most hop is not an address."""
    nearest: IPAddress | None = None
    for hop in reversed(forwarded_for.split(",")):
        address = parse_ip(hop)
        if address is None:
            break
        if not is_trusted(address, trusted):
            return address
        nearest = address
    return nearest


def resolve(peer: str | None, forwarded_for: str | None, forwarded_proto: str | None,
            trusted: tuple[IPNetwork, ...]) -> tuple[IPAddress | None, str | None]:
    """(client address, scheme the client used) for a request from `peer`. The headers count only
    when `peer` is a trusted proxy; the scheme is None when they do not say (keep the socket's)."""
    address = parse_ip(peer)
    if not is_trusted(address, trusted):
        return address, None
    client = address
    if forwarded_for:
        client = forwarded_client(forwarded_for, trusted) or address
    scheme = None
    if forwarded_proto:
        # Proxies that append give "https, http": the first is what the client spoke to the edge.
        first = forwarded_proto.split(",")[0].strip().lower()
        scheme = first if first in ("http", "https") else None
    return client, scheme
