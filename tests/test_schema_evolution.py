"""The schema evolution gate (alpes/schema_evolution.py, `alpes schemas check`): every committed
version pair passes; crafted breaking pairs are refused naming the event, the versions and the
field, and the gate's verdict in each direction is what fastavro's real resolution does."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from decimal import Decimal
from itertools import pairwise
from pathlib import Path

import fastavro
import pytest
from typer.testing import CliRunner

from alpes import schema_evolution
from alpes.cli import app
from alpes.kernel.codec import SchemaRegistry

SCHEMAS = Path(schema_evolution.__file__).parent / "schemas"


def _record(*fields, name="Ev"):
    return {"type": "record", "name": name, "namespace": "test", "fields": list(fields)}


def _kind(*symbols, **extra):
    return {"type": "enum", "name": "Kind", "symbols": list(symbols), **extra}


ID = {"name": "id", "type": "string"}
AMOUNT = {"name": "amount", "type": "int"}
KIND = {"name": "kind", "type": _kind("A", "B", "C")}
NOTE = {"name": "note", "type": ["null", "string"], "default": None}
OLD = _record(ID, AMOUNT, KIND, NOTE)
OLD_DATA = {"id": "e1", "amount": 7, "kind": "C", "note": "n"}


def _with(*fields):
    return _record(*fields)


def fastavro_reads(writer, reader, record) -> bool:
    """Whether fastavro decodes `record`, written with `writer`, into `reader` (its real resolution)."""
    parsed_writer = fastavro.parse_schema(writer, named_schemas={})
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, parsed_writer, record)
    buffer.seek(0)
    try:
        fastavro.schemaless_reader(buffer, parsed_writer, fastavro.parse_schema(reader, named_schemas={}))
    except fastavro.read.SchemaResolutionError:
        return False
    return True


# name: (new schema, a record it writes, the gate's lines expected (empty: compatible both ways))
CASES = {
    "new field without default": (
        _with(ID, AMOUNT, KIND, NOTE, {"name": "canal", "type": "string"}),
        {**OLD_DATA, "canal": "web"},
        ["Ev v1 -> v2: field `canal` added without a default (v1 data cannot be read by the v2 schema)"]),
    "removed field without default in the old schema": (
        _with(ID, KIND, NOTE), {"id": "e1", "kind": "A", "note": None},
        ["Ev v1 -> v2: field `amount` removed, and v1 gives it no default (v2 data cannot be read by the v1 schema)"]),
    "int -> string": (
        _with(ID, {"name": "amount", "type": "string"}, KIND, NOTE), {**OLD_DATA, "amount": "7"},
        ["Ev v1 -> v2: field `amount`: int in v1 cannot be read as string (v2) (v1 data cannot be read by the v2 schema)",
         "Ev v1 -> v2: field `amount`: string in v2 cannot be read as int (v1) (v2 data cannot be read by the v1 schema)"]),
    "enum symbol removed": (
        _with(ID, AMOUNT, {"name": "kind", "type": _kind("A", "B")}, NOTE), {**OLD_DATA, "kind": "B"},
        ["Ev v1 -> v2: field `kind`: enum symbol(s) C removed (v1 data cannot be read by the v2 schema)"]),
    "enum symbol added, the old enum without default": (
        _with(ID, AMOUNT, {"name": "kind", "type": _kind("A", "B", "C", "D")}, NOTE), {**OLD_DATA, "kind": "D"},
        [("Ev v1 -> v2: field `kind`: enum symbol(s) D added, and v1's enum has no default "
          "(v2 data cannot be read by the v1 schema)")]),
    "int -> long: a promotion one way only": (
        _with(ID, {"name": "amount", "type": "long"}, KIND, NOTE), {**OLD_DATA, "amount": 2**40},
        ["Ev v1 -> v2: field `amount`: long in v2 cannot be read as int (v1) (v2 data cannot be read by the v1 schema)"]),
    "union branch changed": (
        _with(ID, AMOUNT, KIND, {"name": "note", "type": ["null", "int"], "default": None}), {**OLD_DATA, "note": 3},
        [("Ev v1 -> v2: field `note`: string in v1 cannot be read as union [null, int] (v2) "
          "(v1 data cannot be read by the v2 schema)"),
         ("Ev v1 -> v2: field `note`: int in v2 cannot be read as union [null, string] (v1) "
          "(v2 data cannot be read by the v1 schema)")]),
    "array of records added with a default": (
        _with(ID, AMOUNT, KIND, NOTE, {"name": "lines", "type": {"type": "array", "items": _record(
            {"name": "sku", "type": "string"}, name="Line")}, "default": []}),
        {**OLD_DATA, "lines": [{"sku": "x"}]},
        []),
    "field added with a default": (
        _with(ID, AMOUNT, KIND, NOTE, {"name": "canal", "type": ["null", "string"], "default": None}),
        {**OLD_DATA, "canal": "web"}, []),
    "field with a default removed": (_with(ID, AMOUNT, KIND), {"id": "e1", "amount": 1, "kind": "A"}, []),
    "string -> bytes": (_with({"name": "id", "type": "bytes"}, AMOUNT, KIND, NOTE), {**OLD_DATA, "id": b"e1"}, []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gate_names_the_field_and_agrees_with_fastavro(case):
    new, new_data, expected = CASES[case]
    assert schema_evolution.check_pair("Ev", 1, OLD, 2, new) == expected
    # The gate's verdict in each direction is fastavro's on data that exercises the change.
    backward = not schema_evolution.breaks(OLD, new)
    forward = not schema_evolution.breaks(new, OLD)
    assert fastavro_reads(OLD, new, OLD_DATA) is backward, f"{case}: new reads old"
    assert fastavro_reads(new, OLD, new_data) is forward, f"{case}: old reads new"


def test_an_enum_default_lets_old_readers_take_new_symbols():
    old = _with(ID, AMOUNT, {"name": "kind", "type": _kind("A", "B", "C", default="A")}, NOTE)
    new = _with(ID, AMOUNT, {"name": "kind", "type": _kind("A", "B", "C", "D", default="A")}, NOTE)
    new_data = {**OLD_DATA, "kind": "D"}
    assert schema_evolution.check_pair("Ev", 1, old, 2, new) == []
    assert fastavro_reads(new, old, new_data) and fastavro_reads(old, new, OLD_DATA)


def test_a_nested_field_is_named_by_its_path():
    address = lambda *fields: {"name": "direccion", "type": _record(*fields, name="Direccion")}
    old = _with(ID, address({"name": "ciudad", "type": "string"}))
    new = _with(ID, address({"name": "ciudad", "type": "string"}, {"name": "pais", "type": "string"}))
    assert schema_evolution.check_pair("Ev", 3, old, 4, new) == [
        "Ev v3 -> v4: field `direccion.pais` added without a default (v3 data cannot be read by the v4 schema)"]
    assert not fastavro_reads(old, new, {"id": "e", "direccion": {"ciudad": "Bogotá"}})
    items = lambda t: {"name": "montos", "type": {"type": "array", "items": t}}
    assert schema_evolution.check_pair("Ev", 1, _with(items("int")), 2, _with(items("string")))[0].startswith(
        "Ev v1 -> v2: field `montos[]`: int in v1 cannot be read as string (v2)")


def test_a_changed_decimal_scale_is_refused_though_fastavro_reads_it():
    """Avro's rule (decimals match only with equal scale and precision): fastavro decodes with the
    writer's scale and would pass it, another reader would not; the gate follows the specification."""
    money = lambda scale: {"name": "monto", "type": {"type": "bytes", "logicalType": "decimal",
                                                     "precision": 9, "scale": scale}}
    problems = schema_evolution.check_pair("Ev", 1, _with(money(2)), 2, _with(money(4)))
    assert problems[0] == ("Ev v1 -> v2: field `monto`: bytes decimal(9,2) in v1 but bytes decimal(9,4) in v2 "
                           "(logical type changed) (v1 data cannot be read by the v2 schema)")
    assert fastavro_reads(_with(money(2)), _with(money(4)), {"monto": Decimal("1.25")})


def test_every_committed_pair_is_compatible_both_ways():
    pairs, problems = schema_evolution.check(SCHEMAS)
    assert problems == []
    registry = SchemaRegistry.from_directory()
    assert pairs == sum(len(v) - 1 for v in registry.schemas.values()) >= 10


def _sample(schema, names: dict):
    """A record for a schema with every optional value present, so that every field is resolved."""
    if isinstance(schema, list):
        return _sample(next(b for b in schema if b != "null"), names)
    if isinstance(schema, str):
        if schema in names:
            return _sample(names[schema], names)
        return {"string": "s", "bytes": b"b", "int": 1, "long": 2, "boolean": True, "float": 1.5, "double": 2.5}[schema]
    kind = schema["type"]
    if isinstance(kind, (dict, list)):
        return _sample(kind, names)
    if schema.get("logicalType") == "decimal":
        return Decimal(1234).scaleb(-schema["scale"])
    if schema.get("logicalType") == "timestamp-micros":
        return datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    if kind == "record":
        names[schema["name"]] = schema
        return {f["name"]: _sample(f["type"], names) for f in schema["fields"]}
    if kind == "enum":
        return schema["symbols"][-1]
    if kind == "array":
        return [_sample(schema["items"], names)]
    if kind == "map":
        return {"k": _sample(schema["values"], names)}
    return _sample(kind, names)


def test_every_committed_pair_resolves_in_fastavro_both_ways():
    """The pairs the gate passes, through fastavro's own resolution, on records with every
    optional value present."""
    schemas = schema_evolution.load(SCHEMAS)
    for event, versions in schemas.items():
        numbers = sorted(versions)
        for old, new in pairwise(numbers):
            older, newer = versions[old], versions[new]
            assert fastavro_reads(older, newer, _sample(older, {})), f"{event} v{new} reading v{old}"
            assert fastavro_reads(newer, older, _sample(newer, {})), f"{event} v{old} reading v{new}"


def _copy_schemas(tmp_path: Path) -> Path:
    target = tmp_path / "schemas"
    target.mkdir()
    for path in SCHEMAS.glob("*.avsc"):
        (target / path.name).write_text(path.read_text())
    return target


def test_cli_passes_on_the_committed_schemas():
    result = CliRunner().invoke(app, ["schemas", "check"])
    assert result.exit_code == 0, result.output
    assert "compatible both ways" in result.output


def test_cli_fails_naming_event_versions_and_field(tmp_path):
    directory = _copy_schemas(tmp_path)
    latest = json.loads((directory / "CampanaCreada.v5.avsc").read_text())
    latest["fields"].append({"name": "canal_preferido", "type": "string"})
    (directory / "CampanaCreada.v6.avsc").write_text(json.dumps(latest))
    result = CliRunner().invoke(app, ["schemas", "check", str(directory)])
    assert result.exit_code == 1
    assert ("CampanaCreada v5 -> v6: field `canal_preferido` added without a default "
            "(v5 data cannot be read by the v6 schema)") in result.output


def test_a_gap_in_versions_is_refused(tmp_path):
    directory = _copy_schemas(tmp_path)
    (directory / "PagoCreado.v2.avsc").rename(directory / "PagoCreado.v3.avsc")
    _pairs, problems = schema_evolution.check(directory)
    assert problems == ["PagoCreado: versions [1, 3] are not 1..2"]
