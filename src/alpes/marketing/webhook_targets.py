"""Where webhooks may be sent: the SSRF rules for endpoint URLs (issue 14).

A webhook makes the platform send requests to a URL a tenant chose, so a URL is a way into the
platform's own network unless it is held to public addresses. Outside the protected local mode an
endpoint URL must be https, carry no user information, and its host must resolve only to public
unicast addresses: not private, loopback, link-local (cloud metadata at 169.254.169.254), multicast,
reserved, unspecified nor shared (100.64/10); an IPv4-mapped IPv6 address is judged as the IPv4 it
maps. It is checked when the endpoint is registered AND at each delivery, and the delivery connects
to the very address that was checked (pinned: the name is not resolved a second time by the HTTP
client), so a DNS answer that changes between the check and the connection (rebinding) gains
nothing. `private_ok` (protected local mode, or the test-only ALPES_WEBHOOK_ALLOW_PRIVATE) lets
http and any address through, for a receiver on 127.0.0.1. Each refusal is a ValueError saying why.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

MAX_URL = 2000
_DEFAULT_PORTS = {"https": 443, "http": 80}

# host, port -> the addresses it resolves to (socket.getaddrinfo's by default; tests pass a fake).
Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as error:  # gaierror is an OSError; a NUL: ValueError
        raise ValueError(f"host {host} does not resolve ({error})") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass(frozen=True)
class Target:
    """A checked destination: connect to `address`, send `host_header`, verify TLS against `host`."""

    url: str  # as registered
    pinned_url: str  # the same URL with the checked address in place of the host name
    host: str
    host_header: str
    address: str


def check_url(url: str, *, private_ok: bool) -> str:
    """`url` if its form may be registered (no DNS: `resolve_target` does that)."""
    if len(url) > MAX_URL:
        raise ValueError(f"at most {MAX_URL} characters")
    if "\\" in url or any(c.isspace() for c in url):
        raise ValueError("no backslashes or whitespace")
    parts = urlsplit(url)
    allowed = ("https", "http") if private_ok else ("https",)
    if parts.scheme not in allowed:
        raise ValueError("must be an https URL" if not private_ok else "must be an http or https URL")
    if "@" in parts.netloc:
        raise ValueError("no user information (user@host)")
    if not parts.hostname:
        raise ValueError("no host")
    if not parts.hostname.isascii():
        raise ValueError("non-ASCII host: write it in its xn-- (IDNA) form")
    if parts.fragment:
        raise ValueError("no fragment (#...)")
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number or out of range)
    except ValueError:
        raise ValueError("bad port") from None
    return url


def public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone index is not part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def resolve_target(url: str, *, private_ok: bool, resolver: Resolver = system_resolver) -> Target:
    """The checked URL and the address to connect to; ValueError if the host does not resolve or any
    of its addresses is not public (unless `private_ok`). Every address is judged, not only the one
    used: a name that also points inside is refused as a whole."""
    check_url(url, private_ok=private_ok)
    parts = urlsplit(url)
    host = parts.hostname
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        addresses = resolver(host, port)
    if not addresses:
        raise ValueError(f"host {host} does not resolve")
    if not private_ok:
        refused = [a for a in addresses if not public_address(a)]
        if refused:
            raise ValueError(f"host {host} resolves to a private, loopback, link-local or reserved address "
                             f"({refused[0]}): only public addresses are allowed")
    address = addresses[0].split("%", 1)[0]
    literal = f"[{address}]" if ":" in address else address
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    host_header = parts.netloc.rpartition("@")[2]
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    return Target(url=url, pinned_url=pinned, host=host, host_header=host_header, address=address)
