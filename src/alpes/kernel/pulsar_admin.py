"""Apache Pulsar's admin REST API (v2): provisioning a namespace, and each subscription's backlog.

`provision()` makes the namespace hold what is asked (partitioned topics with their counts,
non-partitioned dead-letter topics, durable subscriptions, retention, backlog quota and, when the
broker authorizes, the roles' permissions), then reads every item back and fails on any
difference. It changes only what is missing or different, so a second run changes nothing and
says so. A topic that exists with another partition count is an error naming it: repartitioning
is an operator's decision, never a side effect.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx


class ProvisioningError(RuntimeError):
    """The broker refused a call, or holds something that differs from what is asked."""


@dataclass(frozen=True)
class Provisioning:
    """What a namespace must hold. `permissions` (topic -> role -> actions) and
    `subscription_roles` (subscription -> roles) are None on a broker without authorization."""

    topics: dict[str, int]
    dead_letter_topics: tuple[str, ...]
    subscriptions: tuple[tuple[str, str], ...]
    retention: dict
    backlog_quota: dict
    permissions: dict[str, dict[str, tuple[str, ...]]] | None = None
    subscription_roles: dict[str, tuple[str, ...]] | None = None


@dataclass
class ProvisionReport:
    """What a run did, per kind of item: created/changed items by name, and how many were already right."""

    changed: dict[str, list[str]] = field(default_factory=dict)
    unchanged: dict[str, int] = field(default_factory=dict)

    def note(self, kind: str, item: str | None) -> None:
        """`item` changed (None: one more of `kind` was already right)."""
        if item is None:
            self.unchanged[kind] = self.unchanged.get(kind, 0) + 1
        else:
            self.changed.setdefault(kind, []).append(item)

    def summary(self) -> str:
        def counts(numbers: dict[str, int]) -> str:
            return ", ".join(f"{n} {kind}" for kind, n in numbers.items())
        if not self.changed:
            return f"already provisioned: {counts(self.unchanged)} unchanged"
        done = counts({kind: len(items) for kind, items in self.changed.items()})
        kept = counts(self.unchanged)
        return f"provisioned: {done} created or set" + (f"; {kept} unchanged" if kept else "") + "; all verified"


class PulsarAdmin:
    """A thin client of /admin/v2 for one namespace. `token`: a JWT sent as a Bearer token."""

    def __init__(self, admin_url: str, *, tenant: str = "public", namespace: str = "default",
                 token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=f"{admin_url.rstrip('/')}/admin/v2", headers=headers, timeout=timeout)
        self.tenant = tenant
        self.namespace = f"{tenant}/{namespace}"
        self.topics_path = f"/persistent/{tenant}/{namespace}"

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, body: object = None, *, missing_ok: bool = False) -> object:
        """The JSON answer (None when empty, or for a 404 with `missing_ok`); ProvisioningError otherwise."""
        response = self.http.request(method, path, json=body)
        if missing_ok and response.status_code == 404:
            return None
        if response.status_code >= 300:
            reason = response.text[:300]
            try:
                reason = response.json().get("reason", reason)
            except ValueError:
                pass
            raise ProvisioningError(f"{method} {path}: {response.status_code} {reason}")
        return response.json() if response.content else None

    def topic(self, name: str) -> str:
        return f"{self.topics_path}/{name}"

    # -- reading ------------------------------------------------------------------------------
    def partitioned_topics(self) -> dict[str, int]:
        """Short name -> partition count of every partitioned topic of the namespace."""
        names = [n.rsplit("/", 1)[1] for n in self.call("GET", f"{self.topics_path}/partitioned")]
        return {n: self.call("GET", f"{self.topic(n)}/partitions")["partitions"] for n in names}

    def plain_topics(self) -> set[str]:
        """Short names of the non-partitioned topics (the partitions of partitioned ones left out)."""
        names = {n.rsplit("/", 1)[1] for n in self.call("GET", self.topics_path)}
        return {n for n in names if "-partition-" not in n}

    def subscriptions(self, topic: str) -> set[str]:
        return set(self.call("GET", f"{self.topic(topic)}/subscriptions"))

    def permissions(self, topic: str) -> dict[str, tuple[str, ...]]:
        return {role: tuple(sorted(actions)) for role, actions in self.call("GET", f"{self.topic(topic)}/permissions").items()}

    def subscription_roles(self) -> dict[str, tuple[str, ...]]:
        answer = self.call("GET", f"/namespaces/{self.namespace}/permissions/subscription") or {}
        return {name: tuple(sorted(roles)) for name, roles in answer.items()}

    def retention(self) -> dict:
        return self.call("GET", f"/namespaces/{self.namespace}/retention") or {}

    def backlog_quota(self) -> dict:
        quota = (self.call("GET", f"/namespaces/{self.namespace}/backlogQuotaMap") or {}).get("destination_storage", {})
        return {key: quota.get(key) for key in ("limitSize", "limitTime", "policy")}


def provision(admin_url: str, wanted: Provisioning, *, tenant: str = "public", namespace: str = "default",
              token: str | None = None) -> ProvisionReport:
    """Make the namespace hold `wanted`, then verify it by reading everything back."""
    admin = PulsarAdmin(admin_url, tenant=tenant, namespace=namespace, token=token)
    report = ProvisionReport()
    try:
        _namespace(admin, report)
        _topics(admin, wanted, report)
        _subscriptions(admin, wanted, report)
        _policies(admin, wanted, report)
        if wanted.permissions is not None:
            _permissions(admin, wanted, report)
        problems = verify(admin, wanted)
    finally:
        admin.close()
    if problems:
        raise ProvisioningError("provisioned, but reading it back differs: " + "; ".join(problems))
    return report


def _namespace(admin: PulsarAdmin, report: ProvisionReport) -> None:
    if admin.namespace in (admin.call("GET", f"/namespaces/{admin.tenant}", missing_ok=True) or []):
        return
    admin.call("PUT", f"/namespaces/{admin.namespace}")
    report.note("namespaces", admin.namespace)


def _policies(admin: PulsarAdmin, wanted: Provisioning, report: ProvisionReport) -> None:
    # Retention first: Pulsar refuses a backlog quota that is not below the retention size.
    if admin.retention() != wanted.retention:
        admin.call("POST", f"/namespaces/{admin.namespace}/retention", wanted.retention)
        report.note("namespace policies", "retention")
    else:
        report.note("namespace policies", None)
    if admin.backlog_quota() != wanted.backlog_quota:
        admin.call("POST", f"/namespaces/{admin.namespace}/backlogQuota?backlogQuotaType=destination_storage",
                   wanted.backlog_quota)
        report.note("namespace policies", "backlog quota")
    else:
        report.note("namespace policies", None)


def _topics(admin: PulsarAdmin, wanted: Provisioning, report: ProvisionReport) -> None:
    partitioned, plain = admin.partitioned_topics(), admin.plain_topics()
    for topic, count in wanted.topics.items():
        if topic in plain:
            raise ProvisioningError(f"topic {topic} exists without partitions; the contract says {count}")
        if topic in partitioned:
            if partitioned[topic] != count:
                raise ProvisioningError(f"topic {topic} has {partitioned[topic]} partitions on the broker; "
                                        f"the contract says {count}")
            report.note("topics", None)
            continue
        admin.call("PUT", f"{admin.topic(topic)}/partitions", count)
        report.note("topics", topic)
    for topic in wanted.dead_letter_topics:  # non-partitioned: the client's DeadLetterPolicy writes one topic
        if topic in partitioned:
            raise ProvisioningError(f"dead-letter topic {topic} exists with {partitioned[topic]} partitions; "
                                    "it must be a non-partitioned topic")
        if topic in plain:
            report.note("dead-letter topics", None)
            continue
        admin.call("PUT", admin.topic(topic))
        report.note("dead-letter topics", topic)


def _subscriptions(admin: PulsarAdmin, wanted: Provisioning, report: ProvisionReport) -> None:
    for topic in sorted({t for t, _ in wanted.subscriptions}):
        existing = admin.subscriptions(topic)
        for name in [s for t, s in wanted.subscriptions if t == topic]:
            if name in existing:
                report.note("subscriptions", None)
                continue
            # (-1, -1) is MessageId.earliest: nothing published before the subscription exists is skipped.
            admin.call("PUT", f"{admin.topic(topic)}/subscription/{name}", {"ledgerId": -1, "entryId": -1})
            report.note("subscriptions", f"{topic}/{name}")


def _permissions(admin: PulsarAdmin, wanted: Provisioning, report: ProvisionReport) -> None:
    assert wanted.permissions is not None
    for topic, roles in wanted.permissions.items():
        existing = admin.permissions(topic)
        for role, actions in roles.items():
            if existing.get(role) == tuple(sorted(actions)):
                report.note("topic permissions", None)
                continue
            # A grant replaces the role's actions on the topic; other roles are left as they are.
            admin.call("POST", f"{admin.topic(topic)}/permissions/{role}", sorted(actions))
            report.note("topic permissions", f"{role} {'+'.join(actions)} {topic}")
    existing_subs = admin.subscription_roles()
    for name, roles in (wanted.subscription_roles or {}).items():
        if existing_subs.get(name) == tuple(sorted(roles)):
            report.note("subscription permissions", None)
            continue
        admin.call("POST", f"/namespaces/{admin.namespace}/permissions/subscription/{name}", sorted(roles))
        report.note("subscription permissions", f"{name}: {', '.join(roles)}")


def verify(admin: PulsarAdmin, wanted: Provisioning) -> list[str]:
    """Every difference between the namespace, read back now, and `wanted`."""
    problems = []
    partitioned, plain = admin.partitioned_topics(), admin.plain_topics()
    problems += [f"{t}: {partitioned.get(t)} partitions, wanted {n}" for t, n in wanted.topics.items()
                 if partitioned.get(t) != n]
    problems += [f"dead-letter topic {t} missing" for t in wanted.dead_letter_topics if t not in plain]
    for topic in sorted({t for t, _ in wanted.subscriptions}):
        missing = {s for t, s in wanted.subscriptions if t == topic} - admin.subscriptions(topic)
        problems += [f"subscription {topic}/{s} missing" for s in sorted(missing)]
    if admin.retention() != wanted.retention:
        problems.append(f"retention is {admin.retention()}, wanted {wanted.retention}")
    if admin.backlog_quota() != wanted.backlog_quota:
        problems.append(f"backlog quota is {admin.backlog_quota()}, wanted {wanted.backlog_quota}")
    for topic, roles in (wanted.permissions or {}).items():
        got = admin.permissions(topic)
        problems += [f"{role} on {topic}: {got.get(role)}, wanted {actions}" for role, actions in roles.items()
                     if got.get(role) != tuple(sorted(actions))]
    if wanted.subscription_roles is not None:
        got_subs = admin.subscription_roles()
        problems += [f"subscription {name} allows {got_subs.get(name)}, wanted {roles}"
                     for name, roles in wanted.subscription_roles.items() if got_subs.get(name) != tuple(sorted(roles))]
    return problems


class AdminBacklog:
    """Backlog source for BacklogProbe: `subscriptions[name].msgBacklog` of each topic's
    partitioned-stats, the messages stored and not yet acknowledged by the subscription, whichever
    instance holds them. With authorization, a role that may consume the topic may read its stats."""

    description = "pulsar-admin partitioned-stats msgBacklog (messages)"

    def __init__(self, admin_url: str, *, tenant: str = "public", namespace: str = "default",
                 token: str | None = None) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.tenant = tenant
        self.namespace = namespace
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def read(self, subscriptions: Iterable[tuple[str, str]], timeout: float) -> dict[tuple[str, str], int]:
        subscriptions = list(subscriptions)
        values: dict[tuple[str, str], int] = {}
        with httpx.Client(timeout=timeout, headers=self.headers) as http:
            for topic in sorted({t for t, _ in subscriptions}):
                url = f"{self.admin_url}/admin/v2/persistent/{self.tenant}/{self.namespace}/{topic}/partitioned-stats"
                response = http.get(url)
                response.raise_for_status()
                stats = response.json().get("subscriptions", {})
                for t, name in subscriptions:
                    if t == topic and name in stats:
                        values[(t, name)] = int(stats[name].get("msgBacklog", 0))
        return values
