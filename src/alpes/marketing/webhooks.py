"""Webhooks: tenants' endpoints, and the deliveries each event owes them (issue 14).

An endpoint belongs to an advertiser, an affiliate, or the operator (platform-wide). Each event kind
below comes from an event marketing either writes itself (its deliveries are written by the outbox's
`on_add` hook, in the transaction that writes the event) or consumes (written by the consumer's
handler, in the consumer's transaction, with its inbox row). So a delivery exists exactly when its
fact does: none lost on a crash, none twice (unique (endpoint, event)). marketing/webhook_dispatch.py
sends them.

Who receives what (never another tenant's):
- an advertiser: the conversion.*, commission.*, enrollment.* events of its campaigns, its payouts,
  and affiliate.* of the affiliates enrolled in one of its campaigns (marketing knows enrollments,
  not who registered an affiliate: an affiliate's first approval comes before any enrollment and so
  reaches no advertiser);
- an affiliate: its own commission.*, payout.*, enrollment.* and affiliate.* events (conversion.*
  are the advertiser's records of its customers' sales: refused at registration);
- the operator's endpoints: every event.
The data is a tenant-safe view of the event: ids, amounts, states and reasons, never customer data.

An endpoint's signing secret is derived from the platform's master key, its id and its version, and
shown once (at creation and on each rotation); a rotation keeps the previous version signing for
24 h, so both v1 signatures are sent meanwhile.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import and_, delete, false, or_, select, update
from sqlalchemy.orm import Session

from alpes.kernel.access import ADVERTISER, AFFILIATE, OPERATOR, SYSTEM, Principal
from alpes.kernel.db import forget_in_transaction, once_per_transaction
from alpes.kernel.errors import NotFound, RuleViolated
from alpes.kernel.inbox import Handler
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow

from . import tables, webhook_targets
from .webhook_targets import Resolver, system_resolver

# event type -> webhook event kind
KINDS = {
    "ConversionValidated": "conversion.validated",
    "ConversionRejected": "conversion.rejected",
    "ConversionRefunded": "conversion.refunded",
    "ComisionCalculada": "commission.created",
    "ComisionAprobada": "commission.approved",
    "ComisionRevertida": "commission.reversed",
    "PagoCreado": "payout.created",
    "PagoRealizado": "payout.paid",
    "AfiliadoAprobado": "affiliate.approved",
    "AfiliadoSuspendido": "affiliate.suspended",
    "AfiliadoInscrito": "enrollment.created",
}
EVENT_KINDS = tuple(KINDS.values())
AFFILIATE_KINDS = tuple(k for k in EVENT_KINDS if not k.startswith("conversion."))

PENDIENTE, ENTREGADA, FALLIDA = "pendiente", "entregada", "fallida"
ESTADOS_ENTREGA = (PENDIENTE, ENTREGADA, FALLIDA)
PREVIOUS_SECRET_VALID_FOR = timedelta(hours=24)
SECRET_PREFIX = "alpes_whsec_"


# -- secrets --------------------------------------------------------------------------------------
def displayed_secret(master: bytes, webhook_id: str, version: int) -> str:
    """`alpes_whsec_<64 hex>`: computed from the master key, never stored. As with postback secrets,
    the HMAC key is the UTF-8 of this string, so a receiver verifies with the string it was shown."""
    message = b"alpes-webhook-v1|" + webhook_id.encode("utf-8") + b"|" + str(version).encode("ascii")
    return SECRET_PREFIX + hmac.new(master, message, hashlib.sha256).hexdigest()


def signing_keys(master: bytes, endpoint, now: datetime) -> list[bytes]:
    """The keys that sign its deliveries now: the current version's, then the previous one's while
    it is still valid (the 24 h after a rotation)."""
    version = endpoint["secreto_version"]
    keys = [displayed_secret(master, endpoint["id"], version).encode("ascii")]
    if version > 1 and endpoint["secreto_anterior_hasta"] is not None and now < endpoint["secreto_anterior_hasta"]:
        keys.append(displayed_secret(master, endpoint["id"], version - 1).encode("ascii"))
    return keys


# -- endpoints --------------------------------------------------------------------------------------
def _owner(caller: Principal) -> tuple[str, str | None]:
    if caller.role == ADVERTISER and caller.anunciante_id:
        return ADVERTISER, caller.anunciante_id
    if caller.role == AFFILIATE and caller.afiliado_id:
        return AFFILIATE, caller.afiliado_id
    if caller.role in (OPERATOR, SYSTEM):
        return OPERATOR, None
    raise RuleViolated(None, "this key belongs to no advertiser nor affiliate: it cannot own a webhook endpoint")


def _checked(rol: str, url: str, eventos: Sequence[str], private_ok: bool, resolver: Resolver) -> tuple[str, str]:
    try:
        webhook_targets.resolve_target(url, private_ok=private_ok, resolver=resolver)
    except ValueError as error:
        raise RuleViolated("url", str(error)) from None
    unknown = [e for e in eventos if e not in EVENT_KINDS]
    if unknown:
        raise RuleViolated("eventos", f"unknown event kind {unknown[0]!r}: one of {', '.join(EVENT_KINDS)}")
    if not eventos:
        raise RuleViolated("eventos", "at least one event kind")
    if rol == AFFILIATE and (refused := [e for e in eventos if e not in AFFILIATE_KINDS]):
        raise RuleViolated("eventos", f"{refused[0]}: conversion events are the advertiser's; an affiliate "
                                      f"may subscribe to {', '.join(AFFILIATE_KINDS)}")
    return url, ",".join(dict.fromkeys(eventos))


def create_webhook(session: Session, caller: Principal, *, url: str, eventos: Sequence[str],
                   descripcion: str | None, habilitado: bool, now: datetime, private_ok: bool,
                   resolver: Resolver = system_resolver) -> str:
    """A new endpoint of the caller (an operator's: platform-wide), its secret at version 1."""
    rol, propietario = _owner(caller)
    url, kinds = _checked(rol, url, eventos, private_ok, resolver)
    webhook_id = new_id()
    forget_in_transaction(session, _ANY_ENDPOINT_KEY)
    session.execute(tables.webhooks.insert().values(
        id=webhook_id, propietario_rol=rol, propietario_id=propietario, url=url, eventos=kinds,
        descripcion=descripcion, habilitado=habilitado, fallos_consecutivos=0, secreto_version=1,
        creado_en=now, actualizado_en=now))
    return webhook_id


def update_webhook(session: Session, caller: Principal, webhook_id: str, *, url: str, eventos: Sequence[str],
                   descripcion: str | None, habilitado: bool, now: datetime, private_ok: bool,
                   resolver: Resolver = system_resolver) -> None:
    """Replace url, kinds, description and whether it is enabled. Enabling an endpoint the platform
    disabled is the same as POST .../habilitar."""
    current = get_webhook(session, caller, webhook_id, lock=True)
    url, kinds = _checked(current["propietario_rol"], url, eventos, private_ok, resolver)
    w = tables.webhooks
    session.execute(update(w).where(w.c.id == webhook_id).values(
        url=url, eventos=kinds, descripcion=descripcion, actualizado_en=now))
    if habilitado and not current["habilitado"]:
        enable_webhook(session, caller, webhook_id, now)
    elif not habilitado and current["habilitado"]:
        session.execute(update(w).where(w.c.id == webhook_id).values(habilitado=False, deshabilitado_en=now,
                                                                      deshabilitado_motivo=None))


def enable_webhook(session: Session, caller: Principal, webhook_id: str, now: datetime) -> None:
    """On again, failures forgotten; its pending deliveries are due at once, in their order."""
    get_webhook(session, caller, webhook_id, lock=True)
    w, e = tables.webhooks, tables.webhook_entregas
    session.execute(update(w).where(w.c.id == webhook_id).values(
        habilitado=True, fallos_consecutivos=0, deshabilitado_motivo=None, deshabilitado_en=None, actualizado_en=now))
    session.execute(update(e).where(e.c.webhook_id == webhook_id, e.c.estado == PENDIENTE).values(
        proximo_intento_en=now))


def rotate_secret(session: Session, caller: Principal, webhook_id: str, now: datetime) -> None:
    """The next version of its secret; the one it replaces keeps signing for 24 h (older ones stop)."""
    current = get_webhook(session, caller, webhook_id, lock=True)
    w = tables.webhooks
    session.execute(update(w).where(w.c.id == webhook_id).values(
        secreto_version=current["secreto_version"] + 1, secreto_anterior_hasta=now + PREVIOUS_SECRET_VALID_FOR,
        actualizado_en=now))


def delete_webhook(session: Session, caller: Principal, webhook_id: str) -> None:
    """Gone with its deliveries and their log: nothing more is sent to it."""
    get_webhook(session, caller, webhook_id, lock=True)
    e, i = tables.webhook_entregas, tables.webhook_intentos
    session.execute(delete(i).where(i.c.entrega_id.in_(select(e.c.id).where(e.c.webhook_id == webhook_id)
                                                        .scalar_subquery())))
    session.execute(delete(e).where(e.c.webhook_id == webhook_id))
    session.execute(delete(tables.webhooks).where(tables.webhooks.c.id == webhook_id))


def _visible(query, caller: Principal):
    w = tables.webhooks
    if caller.role in (OPERATOR, SYSTEM):
        return query
    if caller.role == ADVERTISER and caller.anunciante_id:
        return query.where(w.c.propietario_rol == ADVERTISER, w.c.propietario_id == caller.anunciante_id)
    if caller.role == AFFILIATE and caller.afiliado_id:
        return query.where(w.c.propietario_rol == AFFILIATE, w.c.propietario_id == caller.afiliado_id)
    return query.where(false())


def get_webhook(session: Session, caller: Principal, webhook_id: str, *, lock: bool = False):
    """The endpoint if the caller may see it (an operator, or its owner); NotFound otherwise."""
    query = _visible(select(tables.webhooks), caller).where(tables.webhooks.c.id == webhook_id)
    row = session.execute(query.with_for_update() if lock else query).mappings().first()
    if row is None:
        raise NotFound("webhook_id", "no webhook endpoint with this id")
    return row


def list_webhooks(session: Session, caller: Principal, limit: int, offset: int) -> list:
    w = tables.webhooks
    query = _visible(select(w), caller).order_by(w.c.creado_en, w.c.id).limit(limit).offset(offset)
    return session.execute(query).mappings().all()


def list_entregas(session: Session, caller: Principal, webhook_id: str, *, estado: str | None, limit: int,
                  offset: int, entrega_id: int | None = None) -> list[dict]:
    """Its deliveries, newest first, each with its attempts (oldest first)."""
    get_webhook(session, caller, webhook_id)
    e, i = tables.webhook_entregas, tables.webhook_intentos
    query = select(e).where(e.c.webhook_id == webhook_id)
    if estado is not None:
        query = query.where(e.c.estado == estado)
    if entrega_id is not None:
        query = query.where(e.c.id == entrega_id)
    rows = [dict(r) for r in session.execute(query.order_by(e.c.id.desc()).limit(limit).offset(offset)).mappings()]
    attempts: dict[int, list] = {r["id"]: [] for r in rows}
    if rows:
        for a in session.execute(select(i).where(i.c.entrega_id.in_(list(attempts))).order_by(i.c.id)).mappings():
            attempts[a["entrega_id"]].append(dict(a))
    for row in rows:
        row["historial"] = attempts[row["id"]]
    return rows


def resend_entrega(session: Session, caller: Principal, webhook_id: str, entrega_id: int, now: datetime) -> dict:
    """Send it again by hand (delivered, failed or still retrying): due now, a fresh 24 h of retries."""
    get_webhook(session, caller, webhook_id)
    e = tables.webhook_entregas
    found = session.execute(select(e.c.id).where(e.c.id == entrega_id, e.c.webhook_id == webhook_id)
                            .with_for_update()).first()
    if found is None:
        raise NotFound("entrega_id", "no delivery with this id for this endpoint")
    session.execute(update(e).where(e.c.id == entrega_id).values(estado=PENDIENTE, proximo_intento_en=now,
                                                                 primer_intento_en=None))
    return list_entregas(session, caller, webhook_id, estado=None, limit=1, offset=0, entrega_id=entrega_id)[0]


# -- events -> deliveries -------------------------------------------------------------------------------
def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _view(event_type: str, p: dict) -> tuple[str, dict, str | None, str | None, str | None]:
    """(object id, tenant-safe data, campaign id, advertiser id, affiliate id) of one event."""
    if event_type.startswith("Conversion"):
        data = {"conversion_id": p["conversion_id"], "campaign_id": p["campaign_id"],
                "affiliate_id": p["affiliate_id"], "conversion_value": _text(p.get("conversion_value")),
                "currency": p.get("currency")}
        if event_type == "ConversionValidated":
            data["conversion_type"] = p["conversion_type"]
        elif event_type == "ConversionRejected":
            data.update(reason=p["reason"], compensation=p["compensation"])
        else:
            data.update(refund_type=p["refund_type"], reason=p.get("reason"))
        # conversion.* are not sent to affiliates (AFFILIATE_KINDS): no affiliate id as receiver.
        return p["conversion_id"], data, p["campaign_id"], None, None
    if event_type.startswith("Comision"):
        data = {"commission_id": p["id"], "conversion_id": p["conversion_id"], "campaign_id": p["campana_id"],
                "affiliate_id": p["afiliado_id"], "amount": _text(p["monto"]), "currency": p["moneda"]}
        if event_type == "ComisionRevertida":
            data.update(previous_status=p["estado_anterior"], reason=p["motivo"])
        return p["id"], data, p["campana_id"], None, p["afiliado_id"]
    if event_type.startswith("Pago"):
        data = {"payout_id": p["id"], "advertiser_id": p.get("anunciante_id"), "affiliate_id": p["afiliado_id"],
                "amount": _text(p["monto"]), "currency": p["moneda"]}
        if event_type == "PagoRealizado":
            data["commission_ids"] = list(p["comision_ids"])
        return p["id"], data, None, p.get("anunciante_id"), p["afiliado_id"]
    if event_type == "AfiliadoInscrito":
        data = {"enrollment_id": p["inscripcion_id"], "campaign_id": p["campana_id"], "affiliate_id": p["afiliado_id"],
                "link_code": p["link_code"]}
        return p["inscripcion_id"], data, p["campana_id"], None, p["afiliado_id"]
    data = {"affiliate_id": p["id"]}  # AfiliadoAprobado / AfiliadoSuspendido
    if event_type == "AfiliadoSuspendido":
        data["reason"] = p["motivo"]
    return p["id"], data, None, None, p["id"]


def _advertisers(session: Session, event_type: str, campana_id: str | None, anunciante_id: str | None,
                 afiliado_id: str | None) -> set[str]:
    c, i = tables.campanas, tables.inscripciones
    if anunciante_id is not None:
        return {anunciante_id}
    if campana_id is not None:
        owner = session.scalar(select(c.c.anunciante_id).where(c.c.id == campana_id))
        return {owner} if owner else set()
    if event_type.startswith("Afiliado") and afiliado_id is not None:
        return set(session.scalars(select(c.c.anunciante_id).distinct().join(i, i.c.campana_id == c.c.id).where(
            i.c.afiliado_id == afiliado_id, c.c.anunciante_id.is_not(None))))
    return set()  # a payout of the operator's own campaigns


_ANY_ENDPOINT = select(tables.webhooks.c.id).limit(1)  # built once: asked for most events marketing sees
_ANY_ENDPOINT_KEY = "marketing.webhooks.any"


def _any_endpoint(session: Session) -> bool:
    """Whether any endpoint exists, asked once per transaction: a consumer's batch owes deliveries to
    the endpoints there when it is handled, as of its first event (a whole batch is one unit of
    work, as if handled at once; one created meanwhile by another transaction gets the events
    after it, as it would have with a batch handled a moment earlier). Not kept across
    transactions, so never stale for another instance's endpoint; one created in this transaction
    drops it (create_webhook)."""
    return once_per_transaction(session, _ANY_ENDPOINT_KEY, lambda s: s.execute(_ANY_ENDPOINT).first() is not None)


def queue_deliveries(session: Session, event_id: str, event_type: str, payload: dict, occurred_at: datetime,
                     now: datetime | None = None) -> int:
    """Write the deliveries `event` owes to the endpoints subscribed to its kind (none: no row).
    Returns how many."""
    kind = KINDS.get(event_type)
    w = tables.webhooks
    # The common case on a platform with no endpoint: one indexed probe per transaction, no campaign lookup.
    if kind is None or not _any_endpoint(session):
        return 0
    objeto_id, data, campana_id, anunciante_id, afiliado_id = _view(event_type, payload)
    advertisers = _advertisers(session, event_type, campana_id, anunciante_id, afiliado_id)
    owners = [w.c.propietario_rol == OPERATOR]
    if advertisers:
        owners.append(and_(w.c.propietario_rol == ADVERTISER, w.c.propietario_id.in_(sorted(advertisers))))
    if afiliado_id is not None and kind in AFFILIATE_KINDS:
        owners.append(and_(w.c.propietario_rol == AFFILIATE, w.c.propietario_id == afiliado_id))
    endpoints = [r for r in session.execute(select(w.c.id, w.c.eventos).where(or_(*owners))).mappings()
                 if kind in r["eventos"].split(",")]
    if not endpoints:
        return 0
    now = now or utcnow()
    body = json.dumps({"id": event_id, "type": kind, "created_at": occurred_at.isoformat(), "data": data},
                      separators=(",", ":"), sort_keys=True)
    session.execute(tables.webhook_entregas.insert(), [{
        "webhook_id": endpoint["id"], "event_id": event_id, "tipo": kind, "objeto_id": objeto_id, "cuerpo": body,
        "estado": PENDIENTE, "intentos": 0, "proximo_intento_en": now, "creada_en": now} for endpoint in endpoints])
    return len(endpoints)


def queue_for_own_events(session: Session, events: Sequence[OutgoingEvent]) -> None:
    """The outbox's `on_add` hook: deliveries of the events marketing writes, in their transaction."""
    for event in events:
        if event.event_type in KINDS:
            queue_deliveries(session, event.event_id, event.event_type, event.payload, event.occurred_at)


def also_delivered(handler: Handler) -> Handler:
    """`handler`, then the deliveries its consumed event owes, in the consumer's transaction."""
    def handle(session: Session, event: IncomingEvent) -> Sequence[OutgoingEvent] | None:
        emitted = handler(session, event)
        queue_deliveries(session, event.event_id, event.event_type, event.payload, event.occurred_at)
        return emitted
    handle.__name__ = getattr(handler, "__name__", "handle")
    return handle


def delivered_kinds(handlers: dict[str, Handler], kinds: Iterable[str]) -> dict[str, Handler]:
    """`handlers` with those of `kinds` (event types) wrapped by `also_delivered`."""
    wanted = set(kinds)
    return {event_type: also_delivered(h) if event_type in wanted else h for event_type, h in handlers.items()}

