"""Free loopback ports for the processes the platform starts (broker, services, scratch runs)."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterable
from pathlib import Path


def free_port() -> int:
    """A port the kernel says is free now (in its ephemeral range)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# Ports this process has handed out: the processes given them may not have bound them yet, so the
# bind check below cannot see them, and a second pick must not return one again.
_HANDED_OUT: set[int] = set()
_HANDING_OUT = threading.Lock()


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listen_port(also: Iterable[int] = ()) -> int:
    """A free port for a process that is killed and started again on the same port (a service,
    the broker). Outside the kernel's ephemeral range: in that range, any outgoing connection
    made while the process is down may take its port, and the restarted process cannot bind.
    `also` are offsets that must be free too (further instances at port + 100 * i). Never one this
    process handed out before (its process may not be listening yet)."""
    offsets = (0, *also)
    low, high = _ephemeral_range()
    ranges = [(first, last - max(offsets)) for first, last in ((10000, low - 1), (high + 1, 65535))
              if last - max(offsets) - first > 1000]
    with _HANDING_OUT:
        for _ in range(200):
            port = random.randint(*random.choice(ranges))
            wanted = [port + offset for offset in offsets]
            if not _HANDED_OUT.intersection(wanted) and all(_bindable(p) for p in wanted):
                _HANDED_OUT.update(wanted)
                return port
    return free_port()
