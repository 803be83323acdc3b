"""contract.PUBLISHES says which topics each service produces to; on Apache Pulsar with
authorization its role may produce there and nowhere else. Checked here against the code: every
`OutgoingEvent(<topic>, ...)` a context builds (its topic a string or a module-level constant of the
context or the kernel), plus the runtime's lifecycle and dead-letter notices on sistema.eventos."""

from __future__ import annotations

import ast
from pathlib import Path

from alpes import contract
from alpes.kernel import runtime

SRC = Path(contract.__file__).parent


def _constants(package: Path) -> dict[str, str]:
    """Module-level `NAME = "..."` assignments of a context (names like TOPIC, MARKETING)."""
    found: dict[str, str] = {}
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found.setdefault(target.id, node.value.value)
    return found


def published_topics(service: str) -> set[str]:
    package = SRC / service
    constants = {**_constants(SRC / "kernel"), **_constants(package)}  # e.g. kernel.runtime.SYSTEM_TOPIC
    topics: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "OutgoingEvent"):
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant):
                topics.add(first.value)
            else:
                assert isinstance(first, ast.Name) and first.id in constants, \
                    f"{path}:{node.lineno}: cannot tell the topic of this OutgoingEvent"
                topics.add(constants[first.id])
    return topics | {runtime.SYSTEM_TOPIC}  # ServicioIniciado/Detenido/Degradado, MensajeEnviadoADeadLetter


def test_publishes_is_what_each_service_publishes():
    assert set(contract.PUBLISHES) == set(contract.SERVICES)
    for service in contract.SERVICES:
        assert set(contract.PUBLISHES[service]) == published_topics(service), service


def test_permissions_are_least_privilege():
    grants = contract.topic_permissions()
    for service in contract.SERVICES:
        role = contract.broker_role(service)
        consumed = {s.topic for s in contract.subscriptions_of(service)}
        dead_letters = {contract.dead_letter_topic(s.topic, s.name) for s in contract.subscriptions_of(service)}
        mine = {topic: set(roles[role]) for topic, roles in grants.items() if role in roles}
        assert {t for t, a in mine.items() if "consume" in a} == consumed
        assert {t for t, a in mine.items() if "produce" in a} == set(contract.PUBLISHES[service]) | dead_letters
    # Every topic of the contract and every dead-letter topic has its grants; nothing else does.
    assert set(grants) == set(contract.TOPICS) | set(contract.DEAD_LETTER_TOPICS)
    assert set(contract.subscription_roles()) == {s.name for s in contract.SUBSCRIPTIONS}
