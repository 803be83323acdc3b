"""Per-subscription backlog, asked of the broker (never guessed from this process alone).

The number comes from a source the composition root picks: Apache Pulsar's admin API
(`pulsar_admin.AdminBacklog`, in messages) or, on the embedded broker, its Prometheus gauges
(`embedded_broker.MetricsBacklog`, in stored entries). Each source names itself in every answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Protocol


class BacklogSource(Protocol):
    description: str

    def read(self, subscriptions: list[tuple[str, str]], timeout: float) -> dict[tuple[str, str], int]: ...


class BacklogProbe:
    """`read()` -> {(topic, subscription): {"backlog": int | None, "source": ...}}.

    Results are cached for `cache_seconds` so a busy health endpoint does not hammer the broker;
    a broker that does not answer gives backlog None with the error, never a made-up 0, and so
    does a subscription the broker does not report.
    """

    def __init__(self, subscriptions: Iterable[tuple[str, str]], source: BacklogSource, *,
                 cache_seconds: float = 1.0, timeout: float = 2.0) -> None:
        self.subscriptions = list(subscriptions)
        self.source = source
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self._cached: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    def read(self) -> dict[tuple[str, str], dict]:
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            name = self.source.description
            try:
                values = self.source.read(self.subscriptions, self.timeout)
                result = {key: {"backlog": values.get(key), "source": name} for key in self.subscriptions}
            except Exception as error:  # the broker's answer is the truth; without it, say so
                result = {key: {"backlog": None, "source": name, "error": str(error)[:200]}
                          for key in self.subscriptions}
            self._cached = (time.monotonic(), result)
            return result
