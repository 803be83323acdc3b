"""The contract (contract.py) as what Apache Pulsar's namespace must hold: what `alpes provision`
and `alpes up --broker pulsar` ask kernel/pulsar_admin.py to create and verify."""

from __future__ import annotations

from .contract import (DEAD_LETTER_TOPICS, NAMESPACE_BACKLOG_QUOTA, NAMESPACE_RETENTION, SUBSCRIPTIONS, TOPICS,
                       subscription_roles, topic_permissions)
from .kernel.pulsar_admin import Provisioning, ProvisionReport, provision
from .settings import Settings


def contract_provisioning(authorization: bool) -> Provisioning:
    """Topics, dead-letter topics, subscriptions, namespace policies; the roles' permissions only
    on a broker that authorizes (Pulsar answers a grant with an error when authorization is off)."""
    return Provisioning(
        topics=dict(TOPICS), dead_letter_topics=DEAD_LETTER_TOPICS,
        subscriptions=tuple((s.topic, s.name) for s in SUBSCRIPTIONS),
        retention=dict(NAMESPACE_RETENTION), backlog_quota=dict(NAMESPACE_BACKLOG_QUOTA),
        permissions=topic_permissions() if authorization else None,
        subscription_roles=subscription_roles() if authorization else None)


def provision_pulsar(settings: Settings, admin_url: str, token: str | None) -> ProvisionReport:
    """Provision the configured namespace; with a token (the super-user's) the permissions too."""
    return provision(admin_url, contract_provisioning(authorization=token is not None),
                     tenant=settings.pulsar_tenant, namespace=settings.pulsar_namespace, token=token)
