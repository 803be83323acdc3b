"""Per-subscription backlog, asked of the broker (never guessed from this process alone).

Apache Pulsar: the admin REST API's partitioned-stats, `subscriptions[name].msgBacklog` summed
over partitions: messages stored and not yet acknowledged by the subscription, whichever
instance holds them. The embedded broker (pulsar-lite 0.2.0) has no admin API, and its client
answers OperationNotSupported to get_last_message_id on a partitioned topic; but it exports
Prometheus metrics, where `pulsar_subscription_back_log` is "unacknowledged stored entries" per
partition and subscription. Measured: a batch counts once (50 messages in 5 key-based batches
showed 5) and the gauge is refreshed every few seconds, so it is a lagging count of entries, not
of messages: 0 means drained, more than 0 means work is waiting.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable

import httpx

_METRIC = re.compile(r'^(?P<name>pulsar_subscription_\w+)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class BacklogProbe:
    """`read()` -> {(topic, subscription): {"backlog": int | None, "unit": ..., "source": ...}}.

    Results are cached for `cache_seconds` so a busy health endpoint does not hammer the broker;
    a broker that does not answer gives backlog None with the error, never a made-up 0.
    """

    def __init__(self, subscriptions: Iterable[tuple[str, str]], *, admin_url: str | None = None,
                 metrics_url: str | None = None, tenant: str = "public", namespace: str = "default",
                 cache_seconds: float = 1.0, timeout: float = 2.0) -> None:
        self.subscriptions = list(subscriptions)
        self.admin_url = admin_url.rstrip("/") if admin_url else None
        self.metrics_url = metrics_url
        self.tenant = tenant
        self.namespace = namespace
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self._cached: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    @property
    def source(self) -> str | None:
        if self.admin_url:
            return "pulsar-admin partitioned-stats msgBacklog (messages)"
        if self.metrics_url:
            return "pulsar-lite metrics pulsar_subscription_back_log (stored entries, a batch counts once; lags a few s)"
        return None

    def read(self) -> dict[tuple[str, str], dict]:
        if self.source is None:
            return {}
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < self.cache_seconds:
                return self._cached[1]
            try:
                values = self._from_admin() if self.admin_url else self._from_metrics()
                result = {key: {"backlog": values.get(key), "source": self.source} for key in self.subscriptions}
            except Exception as error:  # the broker's answer is the truth; without it, say so
                result = {key: {"backlog": None, "source": self.source, "error": str(error)[:200]}
                          for key in self.subscriptions}
            self._cached = (time.monotonic(), result)
            return result

    def _from_admin(self) -> dict[tuple[str, str], int]:
        values: dict[tuple[str, str], int] = {}
        with httpx.Client(timeout=self.timeout) as http:
            for topic in sorted({t for t, _ in self.subscriptions}):
                url = f"{self.admin_url}/admin/v2/persistent/{self.tenant}/{self.namespace}/{topic}/partitioned-stats"
                response = http.get(url)
                response.raise_for_status()
                subscriptions = response.json().get("subscriptions", {})
                for t, name in self.subscriptions:
                    if t == topic and name in subscriptions:
                        values[(t, name)] = int(subscriptions[name].get("msgBacklog", 0))
        return values

    def _from_metrics(self) -> dict[tuple[str, str], int]:
        response = httpx.get(self.metrics_url, timeout=self.timeout)
        response.raise_for_status()
        return parse_backlog_metrics(response.text, f"{self.tenant}/{self.namespace}")


def parse_subscription_metrics(text: str, namespace: str) -> dict[tuple[str, str, str], dict[str, float]]:
    """Every `pulsar_subscription_<gauge>` per (topic, subscription, partition): {gauge: value}."""
    samples: dict[tuple[str, str, str], dict[str, float]] = {}
    for line in text.splitlines():
        match = _METRIC.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        if labels.get("namespace", namespace) != namespace:
            continue
        key = (labels.get("topic", ""), labels.get("subscription", ""), labels.get("partition", ""))
        samples.setdefault(key, {})[match["name"].removeprefix("pulsar_subscription_")] = float(match["value"])
    return samples


def parse_backlog_metrics(text: str, namespace: str) -> dict[tuple[str, str], int]:
    """Sum pulsar_subscription_back_log over the partitions of each (topic, subscription)."""
    totals: dict[tuple[str, str], int] = {}
    for (topic, subscription, _), gauges in parse_subscription_metrics(text, namespace).items():
        if "back_log" in gauges:
            totals[(topic, subscription)] = totals.get((topic, subscription), 0) + int(gauges["back_log"])
    return totals


def stalled_partitions(text: str, namespace: str, watched: Iterable[tuple[str, str]], now: float,
                       stall_seconds: float) -> list[str]:
    """The partitions of the `watched` subscriptions that hold stored messages while none is out
    with a consumer and none was handed out for `stall_seconds` (`now`: Unix time, the broker's
    clock). A consumer busy with (or retrying) messages has some unacknowledged: not a stall."""
    watched = set(watched)
    stalled = []
    for (topic, subscription, partition), gauges in sorted(parse_subscription_metrics(text, namespace).items()):
        if (topic, subscription) not in watched:
            continue
        if (gauges.get("back_log", 0) > 0 and gauges.get("unacked_messages", 0) == 0
                and now - gauges.get("last_consumed_timestamp", 0) > stall_seconds):
            stalled.append(f"{topic}/{subscription}#{partition}: {int(gauges['back_log'])} waiting")
    return stalled
