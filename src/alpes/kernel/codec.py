"""Avro codec: one `.avsc` file per event version, writer/reader resolution by fastavro.

Producers encode with the newest version of an event; consumers decode with the writer's
version (carried in the message properties or stored beside the event) resolved into the
reader's version, so every stored or in-flight version stays readable.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro

_FILE = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9]*)\.v(?P<version>\d+)\.avsc$")


class UnknownEvent(LookupError):
    """No schema for that event type/version: the message cannot be understood."""


def schema_files(directory: Path | None = None) -> dict[str, dict[int, Path]]:
    """event type -> version -> its `.avsc` file (default: the package's schemas directory)."""
    root = directory or Path(str(resources.files("alpes") / "schemas"))
    files: dict[str, dict[int, Path]] = {}
    for path in sorted(root.glob("*.avsc")):
        match = _FILE.match(path.name)
        if not match:
            raise ValueError(f"schema file name must be <Event>.v<N>.avsc: {path.name}")
        files.setdefault(match["name"], {})[int(match["version"])] = path
    return files


def raw_schemas(directory: Path | None = None) -> dict[str, dict[int, Any]]:
    """event type -> version -> its schema as written in the `.avsc` file (JSON, not parsed by fastavro)."""
    return {event: {version: json.loads(path.read_text(encoding="utf-8")) for version, path in versions.items()}
            for event, versions in schema_files(directory).items()}


@dataclass
class SchemaRegistry:
    """All versions of every event, loaded from a directory of `.avsc` files."""

    schemas: dict[str, dict[int, Any]] = field(default_factory=dict)

    @classmethod
    def from_directory(cls, directory: Path | None = None) -> "SchemaRegistry":
        root = directory or Path(str(resources.files("alpes") / "schemas"))
        registry = cls()
        for path in sorted(root.glob("*.avsc")):
            match = _FILE.match(path.name)
            if not match:
                raise ValueError(f"schema file name must be <Event>.v<N>.avsc: {path.name}")
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("name") != match["name"]:
                raise ValueError(f"{path.name}: record name {raw.get('name')!r} differs from file name")
            parsed = fastavro.parse_schema(raw, named_schemas={})
            registry.schemas.setdefault(match["name"], {})[int(match["version"])] = parsed
        return registry

    def latest_version(self, event_type: str) -> int:
        return max(self._versions(event_type))

    def versions(self, event_type: str) -> list[int]:
        return sorted(self._versions(event_type))

    def schema(self, event_type: str, version: int) -> Any:
        try:
            return self._versions(event_type)[version]
        except KeyError:
            raise UnknownEvent(f"{event_type} has no schema version {version}") from None

    def _versions(self, event_type: str) -> dict[int, Any]:
        try:
            return self.schemas[event_type]
        except KeyError:
            raise UnknownEvent(f"unknown event type {event_type!r}") from None

    def encode(self, event_type: str, payload: dict[str, Any], version: int | None = None) -> tuple[bytes, int]:
        """Encode with the given version (default: newest). Returns (bytes, version used)."""
        version = version or self.latest_version(event_type)
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, self.schema(event_type, version), payload, strict_allow_default=True)
        return buffer.getvalue(), version

    def decoder(self, event_type: str, writer_version: int) -> Callable[[bytes], dict[str, Any]]:
        """`decode` for many payloads of one type and writer version, resolved into the newest:
        the schemas are looked up once (the replay decodes a million events this way)."""
        writer = self.schema(event_type, writer_version)
        reader = self.schema(event_type, self.latest_version(event_type))
        read = fastavro.schemaless_reader

        def decode(data: bytes) -> dict[str, Any]:
            buffer = io.BytesIO(data)
            record = read(buffer, writer, reader)
            if buffer.tell() != len(data):
                raise ValueError(f"{event_type} v{writer_version}: {len(data) - buffer.tell()} trailing bytes")
            return record
        return decode

    def decode(self, event_type: str, data: bytes, writer_version: int, reader_version: int | None = None) -> dict[str, Any]:
        """Decode bytes written with `writer_version`, resolved into `reader_version` (default newest)."""
        writer = self.schema(event_type, writer_version)
        reader = self.schema(event_type, reader_version or self.latest_version(event_type))
        buffer = io.BytesIO(data)
        record = fastavro.schemaless_reader(buffer, writer, reader)
        if buffer.tell() != len(data):
            raise ValueError(f"{event_type} v{writer_version}: {len(data) - buffer.tell()} trailing bytes")
        return record
