"""Schema evolution gate: each new version of an event must be backward and forward compatible with
the one before it under Avro's resolution rules.

Backward: the new schema reads data the old one wrote (a consumer upgraded first, events already in
the event store or the topic). Forward: the old schema reads data the new one writes (a producer
upgraded first, a consumer not yet). Both hold, so services can be upgraded in any order.

The rules are Avro 1.11's schema resolution (https://avro.apache.org/docs/1.11.1/specification/
#schema-resolution), checked on the schemas themselves rather than on sample data, so every field
is covered: a reader's field the writer lacks needs a default; a writer's type must be the reader's
or promotable to it (int -> long -> float -> double, string <-> bytes); records, enums and fixed keep
their name; an enum reader knows every writer symbol or has a default; every branch of a writer's
union resolves in the reader. Logical types must stay the same (a decimal its scale and precision):
Avro would resolve the underlying types and silently change the meaning. Nothing here knows an event.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from .kernel.codec import raw_schemas

PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
NAMED = {"record", "enum", "fixed"}
# writer type -> reader types it is promoted to
PROMOTIONS = {"int": {"long", "float", "double"}, "long": {"float", "double"}, "float": {"double"},
              "string": {"bytes"}, "bytes": {"string"}}


@dataclass(frozen=True)
class Break:
    """One place where a reader cannot resolve what a writer wrote: `path` names the field
    (`a.b` inside records, `a[]` array items, `a{}` map values; empty for the top level)."""

    path: str
    kind: str  # missing-default | type | name | enum-symbols | fixed-size | logical-type | union
    writer: str = ""
    reader: str = ""


def breaks(writer: Any, reader: Any) -> list[Break]:
    """Every reason the `reader` schema cannot read data written with the `writer` schema (JSON
    schemas as in the .avsc files); empty when it always can."""
    return _Resolver(writer, reader).resolve(writer, reader, "")


class _Resolver:
    def __init__(self, writer: Any, reader: Any) -> None:
        self.writer_names = _named_types(writer)
        self.reader_names = _named_types(reader)
        self.seen: set[tuple[str, str]] = set()  # recursive named types: each pair resolved once

    def resolve(self, w: Any, r: Any, path: str) -> list[Break]:
        w, r = self._deref(w, self.writer_names), self._deref(r, self.reader_names)
        if isinstance(w, list):  # writer union: whichever branch was written must resolve
            found = []
            for branch in w:
                found += self.resolve(branch, r, path)
            return found
        if isinstance(r, list):  # reader union: the first branch of the writer's type, else the first it promotes to
            branches = [self._deref(b, self.reader_names) for b in r]
            branch = next((b for b in branches if _kind(b) == _kind(w) and _matches(w, b)), None) \
                or next((b for b in branches if _matches(w, b)), None)
            if branch is None:
                return [Break(path, "union", _describe(w), _describe(r))]
            return self.resolve(w, branch, path)
        if not _matches(w, r):
            kind = "name" if _kind(w) == _kind(r) and _kind(w) in NAMED else "type"
            return [Break(path, kind, _describe(w), _describe(r))]
        if _logical(w) != _logical(r):
            return [Break(path, "logical-type", _describe(w), _describe(r))]
        kind = _kind(w)
        if kind == "record":
            return self._record(w, r, path)
        if kind == "enum":
            lost = [s for s in w["symbols"] if s not in r["symbols"]]
            return [Break(path, "enum-symbols", ", ".join(lost), "")] if lost and "default" not in r else []
        if kind == "fixed" and w["size"] != r["size"]:
            return [Break(path, "fixed-size", str(w["size"]), str(r["size"]))]
        if kind == "array":
            return self.resolve(w["items"], r["items"], f"{path}[]")
        if kind == "map":
            return self.resolve(w["values"], r["values"], f"{path}{{}}")
        return []

    def _record(self, w: dict, r: dict, path: str) -> list[Break]:
        pair = (_fullname(w), _fullname(r))
        if pair in self.seen:
            return []
        self.seen.add(pair)
        written = {f["name"]: f for f in w["fields"]}
        for f in w["fields"]:
            for alias in f.get("aliases", []):
                written.setdefault(alias, f)
        found = []
        for field in r["fields"]:
            where = f"{path}.{field['name']}" if path else field["name"]
            source = next((written[n] for n in [field["name"], *field.get("aliases", [])] if n in written), None)
            if source is None:
                if "default" not in field:
                    found.append(Break(where, "missing-default"))
                continue
            found += self.resolve(source["type"], field["type"], where)
        return found

    @staticmethod
    def _deref(schema: Any, names: dict[str, Any]) -> Any:
        if isinstance(schema, str) and schema not in PRIMITIVES:
            return names.get(schema, schema)
        if isinstance(schema, dict) and isinstance(schema.get("type"), (dict, list)):
            return schema["type"]  # {"type": {...}} wraps a schema
        if isinstance(schema, dict) and schema.get("type") in PRIMITIVES and "logicalType" not in schema:
            return schema["type"]
        return schema


def _named_types(schema: Any, namespace: str = "", found: dict | None = None) -> dict[str, Any]:
    """Every record, enum and fixed defined in a schema, by full and by short name."""
    found = {} if found is None else found
    if isinstance(schema, list):
        for branch in schema:
            _named_types(branch, namespace, found)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in NAMED:
            namespace = schema.get("namespace", namespace)
            found[_fullname(schema, namespace)] = found[schema["name"].rsplit(".", 1)[-1]] = schema
        for child in ([f["type"] for f in schema.get("fields", [])]
                      + [schema.get(k) for k in ("items", "values") if k in schema]
                      + ([kind] if isinstance(kind, (dict, list)) else [])):
            _named_types(child, namespace, found)
    return found


def _kind(schema: Any) -> str:
    return schema if isinstance(schema, str) else schema["type"]


def _fullname(schema: dict, namespace: str = "") -> str:
    name = schema["name"]
    namespace = schema.get("namespace", namespace)
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _logical(schema: Any) -> tuple:
    if not isinstance(schema, dict) or "logicalType" not in schema:
        return ()
    return schema["logicalType"], schema.get("precision"), schema.get("scale", 0)


def _matches(w: Any, r: Any) -> bool:
    """Avro's 'the schemas match' (type level): the same kind (named types: the same unqualified
    name), or a writer primitive promotable to the reader's."""
    wk, rk = _kind(w), _kind(r)
    if wk in NAMED or rk in NAMED:
        names = {n.rsplit(".", 1)[-1] for n in [r["name"], *r.get("aliases", [])]} if rk in NAMED else set()
        return wk == rk and w["name"].rsplit(".", 1)[-1] in names
    return wk == rk or rk in PROMOTIONS.get(wk, set())


def _describe(schema: Any) -> str:
    if isinstance(schema, list):
        return "union [" + ", ".join(_describe(b) for b in schema) + "]"
    if isinstance(schema, str):
        return schema
    kind = schema["type"]
    if "logicalType" in schema:
        extra = f"({schema.get('precision')},{schema.get('scale', 0)})" if schema["logicalType"] == "decimal" else ""
        return f"{kind} {schema['logicalType']}{extra}"
    if kind in NAMED:
        return f"{kind} {schema['name']}"
    if kind == "array":
        return f"array of {_describe(schema['items'])}"
    if kind == "map":
        return f"map of {_describe(schema['values'])}"
    return str(kind)


# -- the gate over a directory of <Event>.v<N>.avsc --------------------------------------------------

def explain(event: str, old: int, new: int, problem: Break, backward: bool) -> str:
    """One line naming the event, the versions, the field and why. `backward`: the new schema
    reading old data; else the old schema reading new data."""
    field = f"field `{problem.path}`" if problem.path else "the record"
    consequence = (f"v{old} data cannot be read by the v{new} schema" if backward
                   else f"v{new} data cannot be read by the v{old} schema")
    writer_v, reader_v = (old, new) if backward else (new, old)
    if problem.kind == "missing-default":
        what = (f"{field} added without a default" if backward
                else f"{field} removed, and v{old} gives it no default")
    elif problem.kind == "enum-symbols":
        what = (f"{field}: enum symbol(s) {problem.writer} removed" if backward
                else f"{field}: enum symbol(s) {problem.writer} added, and v{old}'s enum has no default")
    elif problem.kind == "fixed-size":
        what = f"{field}: fixed size {problem.writer} in v{writer_v}, {problem.reader} in v{reader_v}"
    elif problem.kind == "logical-type":
        what = f"{field}: {problem.writer} in v{writer_v} but {problem.reader} in v{reader_v} (logical type changed)"
    elif problem.kind == "name":
        what = f"{field}: {problem.writer} in v{writer_v} but {problem.reader} in v{reader_v} (renamed)"
    else:  # type, union
        what = f"{field}: {problem.writer} in v{writer_v} cannot be read as {problem.reader} (v{reader_v})"
    return f"{event} v{old} -> v{new}: {what} ({consequence})"


def check_pair(event: str, old: int, old_schema: Any, new: int, new_schema: Any) -> list[str]:
    """Why v`new` of `event` is not backward and forward compatible with v`old`; empty if it is."""
    return ([explain(event, old, new, b, backward=True) for b in breaks(old_schema, new_schema)]
            + [explain(event, old, new, b, backward=False) for b in breaks(new_schema, old_schema)])


def load(directory: Path | None = None) -> dict[str, dict[int, Any]]:
    """event -> version -> JSON schema, from the <Event>.v<N>.avsc files of `directory` (default:
    the package's)."""
    return raw_schemas(directory)


def check(directory: Path | None = None) -> tuple[int, list[str]]:
    """(pairs checked, problems) for every consecutive version pair of every event in `directory`.
    A gap in the versions (v1, v3) is a problem too: the pair around it would go unchecked."""
    pairs, problems = 0, []
    for event, versions in sorted(load(directory).items()):
        numbers = sorted(versions)
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"{event}: versions {numbers} are not 1..{len(numbers)}")
        for old, new in pairwise(numbers):
            pairs += 1
            problems += check_pair(event, old, versions[old], new, versions[new])
    return pairs, problems
