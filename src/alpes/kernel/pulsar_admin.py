"""Apache Pulsar's admin REST API (v2): provisioning a cluster, and each subscription's backlog."""

from __future__ import annotations

from collections.abc import Iterable

import httpx


def provision_pulsar_admin(admin_url: str, topics: dict[str, int], subscriptions: Iterable[tuple[str, str]],
                           tenant: str = "public", namespace: str = "default", token: str | None = None) -> None:
    """Create every topic with its partition count and every durable subscription; a topic that
    exists is checked against the contract's count, not trusted."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = f"{admin_url.rstrip('/')}/admin/v2/persistent/{tenant}/{namespace}"
    with httpx.Client(headers=headers, timeout=30) as http:
        for topic, count in topics.items():
            response = http.put(f"{base}/{topic}/partitions", json=count)
            if response.status_code == 409:  # exists: check the count instead of trusting it
                got = http.get(f"{base}/{topic}/partitions").json().get("partitions")
                if got != count:
                    raise RuntimeError(f"{topic} has {got} partitions on the cluster; contract says {count}")
            elif response.status_code >= 300:
                raise RuntimeError(f"creating {topic}: {response.status_code} {response.text}")
        for topic, sub in subscriptions:
            response = http.put(f"{base}/{topic}/subscription/{sub}", json={"entryId": -1, "ledgerId": -1})
            if response.status_code not in (200, 204, 409):
                raise RuntimeError(f"creating subscription {sub} on {topic}: {response.status_code} {response.text}")


class AdminBacklog:
    """Backlog source for BacklogProbe: `subscriptions[name].msgBacklog` of each topic's
    partitioned-stats, the messages stored and not yet acknowledged by the subscription, whichever
    instance holds them."""

    description = "pulsar-admin partitioned-stats msgBacklog (messages)"

    def __init__(self, admin_url: str, *, tenant: str = "public", namespace: str = "default") -> None:
        self.admin_url = admin_url.rstrip("/")
        self.tenant = tenant
        self.namespace = namespace

    def read(self, subscriptions: list[tuple[str, str]], timeout: float) -> dict[tuple[str, str], int]:
        values: dict[tuple[str, str], int] = {}
        with httpx.Client(timeout=timeout) as http:
            for topic in sorted({t for t, _ in subscriptions}):
                url = f"{self.admin_url}/admin/v2/persistent/{self.tenant}/{self.namespace}/{topic}/partitioned-stats"
                response = http.get(url)
                response.raise_for_status()
                stats = response.json().get("subscriptions", {})
                for t, name in subscriptions:
                    if t == topic and name in stats:
                        values[(t, name)] = int(stats[name].get("msgBacklog", 0))
        return values
