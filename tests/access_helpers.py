"""Keys for tests: a key of any role installed straight into one service's key table, as if
learnt from marketing.eventos (the path the broker takes is tested in test_access_across_services)."""

from __future__ import annotations

from datetime import datetime, timezone
from importlib import import_module

from alpes.kernel.access import ALL_SCOPES, KeyRing, generate_key
from alpes.kernel.messages import IncomingEvent


def install_key(runtime, role: str, *, anunciante_id: str | None = None, afiliado_id: str | None = None,
                scopes=ALL_SCOPES, expira_en: datetime | None = None) -> str:
    """A new key of `role` known to the service of `runtime`; returns the key (use `bearer(key)`)."""
    new = generate_key(role)
    now = datetime.now(timezone.utc)
    event = IncomingEvent(
        topic="marketing.eventos", subscription="test", event_id=new.key_id, event_type="ClaveApiEmitida",
        schema_version=1, key=new.key_id, occurred_at=now, correlation_id=new.key_id, causation_id=new.key_id,
        payload={"key_id": new.key_id, "digest": new.digest, "rol": role, "anunciante_id": anunciante_id,
                 "afiliado_id": afiliado_id, "scopes": sorted(scopes), "nombre": None, "expira_en": expira_en,
                 "timestamp": now})
    tables = import_module(f"alpes.{runtime.service}.tables")
    with runtime.db.transaction() as session:
        KeyRing(tables.claves_api).learn_issued(session, event)
    return new.key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
