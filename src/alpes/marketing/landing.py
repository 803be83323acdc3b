"""Where a campaign's tracking links may send visitors: advertisers' domains and landing URLs (pure).

A tracking link redirects to its campaign's landing URL, so a landing URL is an open redirect
unless it is held to hosts its advertiser controls (issue 10, hole 6). An advertiser registers
its domains (a domain covers its subdomains); a landing URL must be https (http only in the
protected local mode) and its host one of them, written the way a browser will read it: no
userinfo (`brand.com@evil.io` goes to evil.io), no IP literal or number-like host (browsers read
`2130706433` and `0x7f.1` as addresses), no loopback or private name (localhost, *.local,
*.internal), no port but the default, no percent-encoding and no non-ASCII (look-alike) host:
an internationalised name is written, and registered, in its xn-- form. Operators' own campaigns
get every refusal but the domain list. Each refusal is a ValueError saying why.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

MAX_DOMAINS = 50
MAX_HOST = 253
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# The last label of a name browsers parse as an IPv4 address (WHATWG URL "ends in a number").
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
# Names that resolve to the machine itself or to a private network, never to an advertiser's site.
_PRIVATE_NAMES = ("localhost", "local", "internal", "localdomain", "lan", "home.arpa", "arpa", "invalid", "onion")
_DEFAULT_PORTS = {"https": 443, "http": 80}


def parse_domain(value: str) -> str:
    """A domain an advertiser registers: a lower-case ASCII host name (IDNs as xn-- A-labels), with
    no scheme, port, path, wildcard or trailing dot, not an IP address nor a private name."""
    if "://" in value or value.startswith("//"):
        raise ValueError("a host name only: no scheme (write brand.com, not https://brand.com)")
    if "*" in value:
        raise ValueError("no wildcards: a registered domain already covers its subdomains")
    if "/" in value or "?" in value or "#" in value:
        raise ValueError("a host name only: no path, query or fragment")
    if ":" in value or value.startswith("["):
        raise ValueError("a host name only: no port, no IPv6 address")
    if value != value.lower():
        raise ValueError("must be lower case")
    return check_host(value)


def parse_domains(values: list[str]) -> tuple[str, ...]:
    """An advertiser's domains, each checked (ValueError naming its position), once each, sorted."""
    if len(values) > MAX_DOMAINS:
        raise ValueError(f"at most {MAX_DOMAINS} domains")
    domains = []
    for position, value in enumerate(values):
        try:
            domains.append(parse_domain(value))
        except ValueError as error:
            raise ValueError(f"dominios[{position}]: {error}") from None
    return tuple(sorted(set(domains)))


def check_host(host: str) -> str:
    """`host` (lower case) when it is a public DNS name a browser reads as written; ValueError otherwise."""
    if not host.isascii():
        raise ValueError("non-ASCII host (a look-alike of another name?): write it in its xn-- (IDNA) form")
    if "%" in host:
        raise ValueError("percent-encoded host")
    if host.endswith("."):
        raise ValueError("no trailing dot")
    if _is_ip_address(host):
        raise ValueError("an IP address, not a domain name")
    if len(host) > MAX_HOST:
        raise ValueError(f"host name longer than {MAX_HOST} characters")
    labels = host.split(".")
    if len(labels) < 2:
        raise ValueError("a single-label name (resolved on the local network): use a public domain name")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise ValueError(f"bad label {label[:63]!r}: letters a-z, digits and inner hyphens, 1 to 63 characters")
        if label[2:4] == "--":
            _check_a_label(label)
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise ValueError("a numeric top-level label: browsers read the host as an IP address")
    if any(host == name or host.endswith("." + name) for name in _PRIVATE_NAMES):
        raise ValueError("a loopback or private-network name")
    return host


def check_landing_url(url: str, dominios: tuple[str, ...] | None, https_only: bool) -> str:
    """`url` when visitors may be sent there. `dominios`: the owning advertiser's domains (None for an
    operator's own campaign: no domain list). `https_only`: false only in the protected local mode."""
    if "\\" in url:
        raise ValueError("no backslashes (browsers read them as slashes, changing the host)")
    parts = urlsplit(url)
    allowed = ("https",) if https_only else ("https", "http")
    if parts.scheme not in allowed:
        raise ValueError("must be an https URL" if https_only else "must be an http or https URL")
    if "@" in parts.netloc:
        raise ValueError("no user information (user@host): the host is what follows the @")
    if parts.netloc.startswith("["):
        raise ValueError("an IP address, not a domain name")
    host, colon, port = parts.netloc.partition(":")
    if not host:
        raise ValueError("no host")
    if not host.isascii():  # before lower-casing: "\u212a".lower() is an ASCII "k"
        raise ValueError("non-ASCII host (a look-alike of another name?): write it in its xn-- (IDNA) form")
    host = check_host(host.lower())  # browsers lower-case the host: Brand.COM is brand.com
    if colon and (not port.isascii() or not port.isdigit() or int(port) != _DEFAULT_PORTS[parts.scheme]):
        raise ValueError(f"no port but the default ({_DEFAULT_PORTS[parts.scheme]} for {parts.scheme})")
    if dominios is not None and not covered(host, dominios):
        raise ValueError(f"host {host} is not one of the advertiser's registered domains (nor a subdomain of one)")
    return url


def covered(host: str, dominios: tuple[str, ...]) -> bool:
    """The host is a registered domain or a subdomain of one (brand.com covers shop.brand.com, not
    brand.com.evil.io nor evilbrand.com)."""
    return any(host == d or host.endswith("." + d) for d in dominios)


def _check_a_label(label: str) -> None:
    """A label with -- in positions 3-4 must be a real IDNA A-label (xn-- and valid punycode of a
    non-ASCII name that encodes back to it); other such labels are reserved."""
    if not label.startswith("xn--"):
        raise ValueError(f"bad label {label!r}: -- in positions 3 and 4 is reserved for xn-- labels")
    try:
        unicode = label[4:].encode("ascii").decode("punycode")
        valid = not unicode.isascii() and "xn--" + unicode.encode("punycode").decode("ascii") == label
    except (UnicodeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"bad label {label!r}: not a valid IDNA A-label")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
