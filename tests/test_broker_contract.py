"""contract.PUBLISHES says which topics each service produces to; on Apache Pulsar with
authorization its role may produce there and nowhere else. contract.EVENT_TOPICS says which event
types go on each topic (and publishers_of who sends them). Both are checked here against the code:
every `OutgoingEvent(<topic>, <event type>, ...)` a context builds (its topic a string or a
module-level constant of the context or the kernel), plus the runtime's lifecycle and dead-letter
notices on sistema.eventos."""

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


# -- contract.EVENT_TOPICS: which event types travel on which topic, and who publishes them ---------
# Read off the code like the topics above: every `OutgoingEvent(<topic>, <event type>, ...)`, its event
# type a literal, a parameter of the function that builds it (then every literal its callers pass,
# through their own parameters), or chosen by code named here.

def _trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(SRC.rglob("*.py"))}


TREES = _trees()


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _enclosing_function(node: ast.AST, parents: dict) -> ast.FunctionDef | None:
    while node is not None and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        node = parents.get(node)
    return node


def _params(function: ast.FunctionDef) -> list[str]:
    names = [a.arg for a in function.args.args]
    return names[1:] if names and names[0] in ("self", "cls") else names


def _passed(function: str, param: str) -> set[str]:
    """The literals passed as `param` at every call of a function named `function`, anywhere in src/alpes."""
    positions = {_params(d).index(param) for tree in TREES.values() for d in ast.walk(tree)
                 if isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef)) and d.name == function
                 and param in _params(d)}
    assert len(positions) == 1, f"{function}({param}): {positions}"
    position = positions.pop()
    values: set[str] = set()
    for path, tree in TREES.items():
        parents = _parents(tree)
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and function in (getattr(call.func, "id", None),
                                                               getattr(call.func, "attr", None))):
                continue
            arg = call.args[position] if position < len(call.args) else \
                next((k.value for k in call.keywords if k.arg == param), None)
            if isinstance(arg, ast.Constant):
                values.add(arg.value)
                continue
            caller = _enclosing_function(call, parents)
            assert isinstance(arg, ast.Name) and caller is not None and arg.id in _params(caller), \
                f"{path}:{call.lineno}: cannot tell the event type passed to {function}"
            values |= _passed(caller.name, arg.id)
    return values


def _event_store_types() -> set[str]:
    """conversiones: the stream's events (records.to_record builds a NewEvent per domain event)."""
    tree = TREES[SRC / "conversiones" / "records.py"]
    return {call.args[0].value for call in ast.walk(tree) if isinstance(call, ast.Call)
            and getattr(call.func, "id", None) == "NewEvent" and isinstance(call.args[0], ast.Constant)}


def _campaign_transition_types() -> set[str]:
    from alpes.marketing import domain
    return {event for _from, _to, event in domain.TRANSICIONES.values()}


# Event types chosen outside the function that builds the OutgoingEvent: (file, expression) -> names.
CHOSEN_ELSEWHERE = {
    ("conversiones/stream.py", "item.event_type"): _event_store_types,
    ("marketing/campaigns.py", "evento"): _campaign_transition_types,
}


def emitted_events(package: Path) -> set[tuple[str, str]]:
    """(topic, event type) of every OutgoingEvent built under `package`."""
    constants = {**_constants(SRC / "kernel"), **_constants(package)}
    found: set[tuple[str, str]] = set()
    for path in sorted(package.rglob("*.py")):
        tree = TREES[path]
        parents = _parents(tree)
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "OutgoingEvent"):
                continue
            named = {k.arg: k.value for k in call.keywords}
            topic_arg, type_arg = (call.args + [named.get("topic"), named.get("event_type")])[:2] \
                if len(call.args) < 2 else call.args[:2]
            where = (str(path.relative_to(SRC)), ast.unparse(type_arg))
            if where == ("kernel/messages.py", "self.event_type"):
                continue  # OutgoingEvent.caused_by: a copy of an event built elsewhere
            topic = topic_arg.value if isinstance(topic_arg, ast.Constant) else constants[topic_arg.id]
            function = _enclosing_function(call, parents)
            if isinstance(type_arg, ast.Constant):
                types = {type_arg.value}
            elif isinstance(type_arg, ast.Name) and function is not None and type_arg.id in _params(function):
                types = _passed(function.name, type_arg.id)
            else:
                assert where in CHOSEN_ELSEWHERE, f"{path}:{call.lineno}: cannot tell the event type of this " \
                                                  "OutgoingEvent: add where it comes from to CHOSEN_ELSEWHERE"
                types = CHOSEN_ELSEWHERE[where]()
            assert types, f"{path}:{call.lineno}: no event type found"
            found |= {(topic, event_type) for event_type in types}
    return found


def test_every_schema_has_a_topic_of_the_contract():
    from alpes.kernel.codec import SchemaRegistry

    assert set(contract.EVENT_TOPICS) == set(SchemaRegistry.from_directory().schemas)
    assert set(contract.EVENT_TOPICS.values()) <= set(contract.TOPICS)
    for event_type, topic in contract.EVENT_TOPICS.items():
        publishers = contract.publishers_of(event_type)
        assert all(topic in contract.PUBLISHES[s] for s in publishers), event_type
        # Only a retired type has no publisher; it is still one a topic of the contract carries.
        assert bool(publishers) is (event_type not in contract.RETIRED_EVENTS), event_type
    assert contract.RETIRED_EVENTS <= set(contract.EVENT_TOPICS)


def test_event_topics_is_what_each_service_emits():
    kernel = emitted_events(SRC / "kernel")  # the runtime's notices, sent by every service
    for service in contract.SERVICES:
        declared = {(contract.EVENT_TOPICS[e], e) for e in contract.EVENT_TOPICS
                    if service in contract.publishers_of(e)}
        code = emitted_events(SRC / service) | kernel
        assert code == declared, (f"{service}: emitted but not in contract.EVENT_TOPICS/publishers_of: "
                                  f"{sorted(code - declared)}; declared but never emitted: {sorted(declared - code)}")
