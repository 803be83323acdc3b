"""Reference data: what conversiones learns of campaigns (and their advertisers), affiliates and
enrollments from marketing.eventos (conversiones-consumer), and what validating a conversion reads
of it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import String, bindparam, delete, exists, func, literal, or_, select, update
from sqlalchemy.orm import Session

from alpes.kernel.db import pending_rows, upsert_add
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, utcnow

from . import domain, tables

# What conversiones knows of an affiliate (ref_afiliados.estado), as marketing announced it.
AFILIADO_HABILITADO = "habilitado"
AFILIADO_SUSPENDIDO = "suspendido"

_CAMPAIGN_STATE = {"CampanaActivada": "activa", "CampanaPausada": "pausada", "CampanaFinalizada": "finalizada"}

# An advertiser's first postback secret (AnuncianteRegistrado), and how long the one a rotation
# replaces stays valid (SecretoPostbackRotado: marketing keeps the same rule).
FIRST_SECRET_VERSION = 1
PREVIOUS_SECRET_VALID_FOR = timedelta(hours=24)


# -- what validation reads ---------------------------------------------------------------------
# Built once, values bound at execution: validation runs on every postback, and building these per
# call cost SQLAlchemy more CPU than running them (issue 11).
_ra, _rc, _ri, _cs = tables.ref_afiliados, tables.ref_campanas, tables.ref_inscripciones, tables.conversion_signals
_AFFILIATE = select(_ra.c.estado, _ra.c.email_sha256).where(_ra.c.afiliado_id == bindparam("affiliate_id"))
_CAMPAIGN = select(_rc.c.estado, _rc.c.moneda, _rc.c.ventana_atribucion_dias, _rc.c.fecha_inicio, _rc.c.fecha_fin,
                   _rc.c.min_segundos_click_conversion, _rc.c.valor_maximo_conversion) \
    .where(_rc.c.campana_id == bindparam("campaign_id"))
# The click a conversion was attributed through: its row, or (not stored: see tracking.ClickRecorder)
# what its signed id says, which attribution verified.
_CLICK = select(tables.click_attributions.c.click_id, tables.clicks.c.clicked_at, tables.clicks.c.link_code) \
    .select_from(tables.click_attributions) \
    .join(tables.clicks, tables.click_attributions.c.click_id == tables.clicks.c.id, isouter=True) \
    .where(tables.click_attributions.c.conversion_id == bindparam("conversion_id"))
_SIGNALS = select(_cs).where(_cs.c.conversion_id == bindparam("conversion_id"))
_WINDOW = (_cs.c.campaign_id == bindparam("campaign_id"), _cs.c.detected_at > bindparam("since"),
           _cs.c.detected_at <= bindparam("until"))
# Counted up to `limit` (all the rule needs): a flood from one IP stays cheap to decide.
_SAME_IP = select(func.count()).select_from(
    select(_cs.c.detected_at).where(*_WINDOW, _cs.c.ip == bindparam("ip")).limit(bindparam("ip_limit")).subquery())
# Only indexed columns (ix_conversion_signals_campaign_caller): the count never reads the rows.
_SAME_CALLER = select(func.count()).select_from(
    select(_cs.c.detected_at).where(*_WINDOW, _cs.c.caller_key == bindparam("caller_key"))
    .limit(bindparam("limit")).subquery())
# The caller's conversions in the minutes [since_minute, until_minute] (tables.caller_minutes): at
# least those of the window (since, until], a few rows whatever the caller's rate.
_cm = tables.caller_minutes
_CALLER_MINUTES = select(func.coalesce(func.sum(_cm.c.conversions), 0)).where(
    _cm.c.campaign_id == bindparam("campaign_id"), _cm.c.caller_key == bindparam("caller_key"),
    _cm.c.minute >= bindparam("since_minute"), _cm.c.minute <= bindparam("until_minute"))
_ENROLLED_BY_LINK = select(_ri.c.activa).where(_ri.c.link_code == bindparam("link_code"))
# (anyone enrolled in the campaign?, this affiliate actively?) in one round trip.
_ENROLLED_BY_IDS = select(
    exists().where(_ri.c.campana_id == bindparam("campaign_id")),
    exists().where(_ri.c.campana_id == bindparam("campaign_id"), _ri.c.afiliado_id == bindparam("affiliate_id"),
                   _ri.c.activa.is_(True)))


# A new postback's reads in one round trip (postback_facts): the campaign (with its owner), the
# affiliate and the click by outer joins to the postback's ids, so an unknown one reads as NULLs;
# its link's enrollment (the stored click's link, else the one its signed id names), the
# enrollments by ids, the velocity counts and whether its order id is taken, as subqueries.
_k, _ok = tables.clicks, tables.order_keys
# The order id's scope (commands.idempotency_scope) from the campaign row: its advertiser's, or the
# campaign's own when it has none or is not known (NULL concatenates to NULL on every backend).
_SCOPE = func.coalesce(literal("anunciante:", String) + _rc.c.anunciante_id,
                       literal("campana:", String) + bindparam("campaign_id", type_=String))
# Two EXISTS, not one with OR: each is one index's lookup (pk_order_keys, ix_order_keys_campaign_order).
_ORDER_KEY_TAKEN = or_(
    exists().where(_ok.c.scope == _SCOPE, _ok.c.order_id == bindparam("order_id")),
    exists().where(_ok.c.campaign_id == bindparam("campaign_id"), _ok.c.order_id == bindparam("order_id")))
_LINK_CODE = func.coalesce(_k.c.link_code, bindparam("signed_link_code", type_=String))
# The postback's ids as a one-row table, which the campaign, affiliate and click are joined to.
_POSTBACK = select(*(bindparam(name, type_=String).label(name)
                     for name in ("campaign_id", "affiliate_id", "click_id"))).subquery("postback")
_POSTBACK_FACTS = select(
    _ra.c.estado.label("afiliado_estado"), _ra.c.email_sha256,
    *_CAMPAIGN.selected_columns, _rc.c.anunciante_id,
    _k.c.clicked_at, _LINK_CODE.label("link_code"),
    select(_ri.c.activa).where(_ri.c.link_code == _LINK_CODE).scalar_subquery().label("enrolled_by_link"),
    *(column.label(name) for column, name in zip(_ENROLLED_BY_IDS.selected_columns,
                                                  ("anyone_enrolled", "affiliate_enrolled"))),
    _SAME_IP.scalar_subquery().label("same_ip"),
    _CALLER_MINUTES.scalar_subquery().label("caller_bound"),
    _ORDER_KEY_TAKEN.label("order_key_taken"),
).select_from(_POSTBACK.outerjoin(_rc, _rc.c.campana_id == _POSTBACK.c.campaign_id)
              .outerjoin(_ra, _ra.c.afiliado_id == _POSTBACK.c.affiliate_id)
              .outerjoin(_k, _k.c.id == _POSTBACK.c.click_id))


def reference(session: Session, affiliate_id: str, campaign_id: str,
              conversion_id: str | None = None, max_conversions_per_ip: int = 5,
              max_conversions_per_caller: int = 10_000) -> domain.Reference:
    """What deciding a stored conversion reads (the validation job's, for conversions left
    detected); a new postback reads the same in one round trip: `postback_facts`."""
    affiliate = session.execute(_AFFILIATE, {"affiliate_id": affiliate_id}).first()
    c = session.execute(_CAMPAIGN, {"campaign_id": campaign_id}).first()
    click = None
    if conversion_id is not None:
        click = session.execute(_CLICK, {"conversion_id": conversion_id}).first()
        if click is not None and click.clicked_at is None:
            click = domain.click_of_stored_id(click.click_id)
    signals = None if conversion_id is None else session.execute(_SIGNALS, {"conversion_id": conversion_id}).first()
    return _reference(
        None if affiliate is None else affiliate.estado, None if affiliate is None else affiliate.email_sha256, c,
        affiliate_enrolled=_enrolled(session, affiliate_id, campaign_id, None if click is None else click.link_code),
        clicked_at=None if click is None else click.clicked_at,
        customer_email_sha256=None if signals is None else signals.customer_email_sha256,
        conversions_from_same_ip=None if signals is None else _conversions_from_same_ip(
            session, signals, max_conversions_per_ip),
        max_conversions_per_ip=max_conversions_per_ip,
        conversions_from_same_caller=None if signals is None else _conversions_from_same_caller(
            session, signals, max_conversions_per_caller),
        max_conversions_per_caller=max_conversions_per_caller)


def _reference(a: str | None, affiliate_email_sha256: str | None, c, **known) -> domain.Reference:
    """The Reference of an affiliate's estado and email hash (None: not known), a campaign row (the
    columns of _CAMPAIGN; None: not known) and the rest as read."""
    return domain.Reference(
        affiliate_enabled=None if a is None else a == AFILIADO_HABILITADO,
        campaign_active=None if c is None else c.estado == "activa",
        campaign_currency=None if c is None else c.moneda,
        affiliate_suspended=a == AFILIADO_SUSPENDIDO,
        attribution_window=None if c is None else timedelta(days=c.ventana_atribucion_dias),
        campaign_starts_at=None if c is None else c.fecha_inicio,
        campaign_ends_at=None if c is None else c.fecha_fin,
        min_seconds_click_to_conversion=None if c is None else c.min_segundos_click_conversion,
        max_conversion_value=None if c is None else c.valor_maximo_conversion,
        affiliate_email_sha256=affiliate_email_sha256, **known)


@dataclass(frozen=True)
class PostbackFacts:
    """What a new postback's transaction reads first: whose campaign it is (tenancy, the scope of its
    order id) and what validating it needs."""

    owner: str | None  # the advertiser that owns the campaign: None when operator-owned or unknown
    reference: domain.Reference
    # False: no key of its order id in its scope (idempotency_scope) nor its campaign (`order_keys`
    # would find none); True: one may be (or `order_id` was not given to postback_facts).
    order_key_taken: bool = True


def postback_facts(session: Session, *, affiliate_id: str, campaign_id: str, click_id: str | None,
                   ip: str | None, customer_email_sha256: str | None, caller_key: str | None, now: datetime,
                   max_conversions_per_ip: int = 5, max_conversions_per_caller: int = 10_000,
                   order_id: str | None = None) -> PostbackFacts:
    """Everything `reference` would read for a postback detected at `now`, in one round trip, read
    before its own rows are written (the caller passes what it is about to store: its click id
    and signals). Its velocity counts are those of the conversions before it, plus itself, each
    counted up to its limit: the figures `reference` counts after its signals are stored, as decided
    by the same rules; except that a caller below its limit may be counted from its minutes'
    totals (caller_minutes: a bound from above, which decides the same)."""
    signed = None if click_id is None else domain.click_of_stored_id(click_id)
    since, ip = now - domain.IP_VELOCITY_WINDOW, None if ip is None else str(ip)
    since_minute = _minute(since)
    window = {"campaign_id": campaign_id, "since": since, "until": now}
    row = session.execute(_POSTBACK_FACTS, {
        **window, "affiliate_id": affiliate_id, "click_id": click_id,
        "signed_link_code": None if signed is None else signed.link_code, "ip": ip,
        "ip_limit": max_conversions_per_ip, "caller_key": caller_key, "since_minute": since_minute,
        "until_minute": _minute(now), "order_id": order_id}).one()
    order_key_taken = bool(row.order_key_taken)
    # The postbacks committed with this one whose rows are not written yet count as if they were
    # (their caller_minutes additions are not written either).
    pending = [other for other in pending_rows(session, _cs) if other["campaign_id"] == campaign_id]
    same_ip = row.same_ip + sum(1 for other in pending if ip is not None and other["ip"] == ip
                                and since < other["detected_at"] <= now)
    same_ip = min(same_ip, max_conversions_per_ip)  # the read counts up to the limit
    same_caller = 0
    if caller_key is not None:
        callers = [other["detected_at"] for other in pending if other["caller_key"] == caller_key]
        # A bound from above: below the limit it decides as the exact count would (not over).
        same_caller = int(row.caller_bound) + sum(1 for at in callers if at >= since_minute)
        if same_caller >= max_conversions_per_caller:  # at the limit: the exact count decides
            same_caller = session.scalar(_SAME_CALLER, {**window, "caller_key": caller_key,
                                                        "limit": max_conversions_per_caller}) \
                + sum(1 for at in callers if since < at <= now)
        same_caller = min(same_caller, max_conversions_per_caller)
    if order_id is not None and not order_key_taken:  # a hint: the same order id anywhere may be it
        order_key_taken = any(other["order_id"] == order_id for other in pending_rows(session, tables.order_keys))
    known = row.estado is not None  # NOT NULL in a stored campaign: NULL only from the outer join
    clicked_at = row.clicked_at if row.clicked_at is not None else None if signed is None else signed.clicked_at
    if row.link_code is not None:  # through a click: its link's enrollment must be active
        enrolled = bool(row.enrolled_by_link)
    else:
        enrolled = None if not row.anyone_enrolled else bool(row.affiliate_enrolled)
    return PostbackFacts(row.anunciante_id, _reference(
        row.afiliado_estado, row.email_sha256, row if known else None,
        affiliate_enrolled=enrolled, clicked_at=clicked_at, customer_email_sha256=customer_email_sha256,
        conversions_from_same_ip=None if ip is None else same_ip + 1,
        max_conversions_per_ip=max_conversions_per_ip,
        # Counted up to `limit` before it: min(all with itself, limit + 1), as `reference` counts.
        conversions_from_same_caller=None if caller_key is None else same_caller + 1,
        max_conversions_per_caller=max_conversions_per_caller),
        order_key_taken=order_id is None or order_key_taken)


def _minute(at: datetime) -> datetime:
    """The UTC minute holding `at`, as caller_minutes keys it."""
    return at.replace(second=0, microsecond=0)


def count_caller_conversion(session: Session, campaign_id: str, caller_key: str, detected_at: datetime,
                            conversion_id: str) -> None:
    """A postback's conversion in its caller's minute (tables.caller_minutes), in its transaction."""
    shard = 0 if session.get_bind().dialect.name == "sqlite" else int(conversion_id[:2], 16) % 8
    upsert_add(session, _cm, {"campaign_id": campaign_id, "caller_key": caller_key,
                              "minute": _minute(detected_at), "shard": shard}, {"conversions": 1})


# -- forgetting what no rule reads any more ------------------------------------------------------
# The signals and the caller's minutes are read by the velocity rules only: a new postback counts the
# hour up to it, the validation job the hour up to a conversion left detected. Kept twice that
# (instances' clocks a little apart), and the signals also as long as a detected conversion may
# still count them. The email hashes go with them: kept no longer than a rule needs them.
SIGNALS_KEPT_FOR = 2 * domain.IP_VELOCITY_WINDOW
_OLDEST_UNDECIDED = select(func.min(_cs.c.detected_at)).select_from(
    tables.conversiones_view.join(_cs, _cs.c.conversion_id == tables.conversiones_view.c.id)).where(
    tables.conversiones_view.c.status == domain.DETECTED)
# SKIP LOCKED: instances sharing a MariaDB database each take other rows.
_OLD_SIGNALS = select(_cs.c.conversion_id).where(_cs.c.detected_at < bindparam("cutoff")) \
    .limit(bindparam("batch")).with_for_update(skip_locked=True)
_FORGET_SIGNALS = delete(_cs).where(_cs.c.conversion_id.in_(bindparam("ids", expanding=True)))
_OLDEST_MINUTE = select(func.min(_cm.c.minute))
_FORGET_MINUTE = delete(_cm).where(_cm.c.minute == bindparam("minute"))


def forget_unread_signals(session: Session, now: datetime, batch: int = 500) -> int:
    """Delete up to `batch` signals no velocity rule can read any more, and the oldest minute of
    the callers' minutes when older than any window; returns how many rows went (the job runs again
    at once while any do). Small batches: on SQLite each holds the write lock every postback waits
    for (500 rows: ~15 ms of CPU here)."""
    cutoff = now - SIGNALS_KEPT_FOR
    oldest_undecided = session.scalar(_OLDEST_UNDECIDED)
    signals_cutoff = cutoff if oldest_undecided is None else min(cutoff, oldest_undecided - SIGNALS_KEPT_FOR)
    ids = session.scalars(_OLD_SIGNALS, {"cutoff": signals_cutoff, "batch": batch}).all()
    if ids:
        session.execute(_FORGET_SIGNALS, {"ids": ids})
    oldest_minute = session.scalar(_OLDEST_MINUTE)
    if oldest_minute is None or oldest_minute >= _minute(cutoff):
        return len(ids)
    return len(ids) + session.execute(_FORGET_MINUTE, {"minute": oldest_minute}).rowcount


def _window(signals) -> dict:
    """The hour up to the signal's conversion, itself included, for its campaign."""
    return {"campaign_id": signals.campaign_id, "since": signals.detected_at - domain.IP_VELOCITY_WINDOW,
            "until": signals.detected_at}


def _conversions_from_same_ip(session: Session, signals, limit: int) -> int | None:
    """Conversions for the campaign from the signal's IP in the hour up to it, itself included,
    counted up to limit + 1."""
    if signals.ip is None:
        return None
    return session.scalar(_SAME_IP, {**_window(signals), "ip": signals.ip, "ip_limit": limit + 1})


def _conversions_from_same_caller(session: Session, signals, limit: int) -> int | None:
    """Conversions for the campaign from the signal's caller in the hour up to it, itself included,
    counted up to limit + 1 (all the rule needs: a busy caller's postbacks stay cheap to decide)."""
    if signals.caller_key is None:
        return None
    return session.scalar(_SAME_CALLER, {**_window(signals), "caller_key": signals.caller_key, "limit": limit + 1})


def _enrolled(session: Session, affiliate_id: str, campaign_id: str, link_code: str | None) -> bool | None:
    """Through a click: its link's enrollment must be active. By ids: an active enrollment, but
    only for a campaign somebody enrolled in (None: not enforced, the original postback contract)."""
    if link_code is not None:
        return bool(session.scalar(_ENROLLED_BY_LINK, {"link_code": link_code}))
    anyone, this_one = session.execute(_ENROLLED_BY_IDS, {"campaign_id": campaign_id,
                                                          "affiliate_id": affiliate_id}).one()
    if not anyone:
        return None
    return bool(this_one)


# -- what conversiones-consumer learns from marketing.eventos ------------------------------------
def learn_campana(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    p = event.payload
    t = tables.ref_campanas
    if not session.scalar(select(exists().where(t.c.campana_id == p["id"]))):
        # v1 events carry no state: they were created active (the v2 reader default).
        session.execute(t.insert().values(campana_id=p["id"], estado=p["estado"], moneda=p["moneda"],
                                          landing_url=p["landing_url"],
                                          ventana_atribucion_dias=p["ventana_atribucion_dias"],
                                          fecha_inicio=p["fecha_inicio"], fecha_fin=p["fecha_fin"],
                                          # Not announced yet by marketing (a CampanaCreada v3 term): None.
                                          min_segundos_click_conversion=p.get("min_segundos_click_conversion"),
                                          # v1-v3 read the v4 default: last click.
                                          modelo_atribucion=p.get("modelo_atribucion") or domain.LAST_CLICK,
                                          # v1-v4 read the v5 defaults: operator-owned, no maximum.
                                          anunciante_id=p.get("anunciante_id"),
                                          valor_maximo_conversion=p.get("valor_maximo_conversion"),
                                          updated_at=utcnow()))
    return []


def learn_campana_terminos(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """CampanaActualizada: the terms validation and redirects read, set to what the event carries
    (all of them, as they are after the change: a redelivery sets the same values). It follows the
    campaign's CampanaCreada (same partition key); conversions already decided keep their outcome."""
    p = event.payload
    t = tables.ref_campanas
    session.execute(update(t).where(t.c.campana_id == p["id"]).values(
        landing_url=p["landing_url"], fecha_fin=p["fecha_fin"],
        min_segundos_click_conversion=p["min_segundos_click_conversion"],
        valor_maximo_conversion=p["valor_maximo_conversion"], updated_at=utcnow()))
    return []


def learn_anunciante(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """AnuncianteRegistrado: the advertiser signs postbacks with its secret's version 1 (a rotation
    that arrived first is kept)."""
    t = tables.ref_anunciantes
    anunciante_id = event.payload["id"]
    if not session.scalar(select(exists().where(t.c.anunciante_id == anunciante_id))):
        session.execute(t.insert().values(anunciante_id=anunciante_id, secreto_version=FIRST_SECRET_VERSION,
                                          secreto_anterior_hasta=None, updated_at=utcnow()))
    return []


def learn_secreto_rotado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """SecretoPostbackRotado: the advertiser's secret moves to `version`; the version before it stays
    valid for 24 hours after the rotation. A version not newer than the known one (a redelivery,
    or a late rotation) changes nothing."""
    p = event.payload
    t = tables.ref_anunciantes
    until = p["timestamp"] + PREVIOUS_SECRET_VALID_FOR
    known = session.scalar(select(t.c.secreto_version).where(t.c.anunciante_id == p["anunciante_id"]))
    if known is None:
        session.execute(t.insert().values(anunciante_id=p["anunciante_id"], secreto_version=p["version"],
                                          secreto_anterior_hasta=until, updated_at=utcnow()))
    elif p["version"] > known:
        session.execute(update(t).where(t.c.anunciante_id == p["anunciante_id"]).values(
            secreto_version=p["version"], secreto_anterior_hasta=until, updated_at=utcnow()))
    return []


def secret_versions(session: Session, anunciante_id: str, now: datetime) -> list[int]:
    """The versions of the advertiser's postback secret that sign today: the current one, and the
    one before it while still valid. Never heard of the advertiser: version 1."""
    t = tables.ref_anunciantes
    row = session.execute(select(t.c.secreto_version, t.c.secreto_anterior_hasta)
                          .where(t.c.anunciante_id == anunciante_id)).first()
    if row is None:
        return [FIRST_SECRET_VERSION]
    versions = [row.secreto_version]
    if row.secreto_version > FIRST_SECRET_VERSION and row.secreto_anterior_hasta is not None \
            and now < row.secreto_anterior_hasta:
        versions.append(row.secreto_version - 1)
    return versions


def campaign_owner(session: Session, campaign_id: str) -> tuple[bool, str | None]:
    """(known?, the advertiser that owns the campaign: None when operator-owned or unknown)."""
    row = session.execute(_OWNER, {"campaign_id": campaign_id}).first()
    return (False, None) if row is None else (True, row.anunciante_id)


_OWNER = select(_rc.c.anunciante_id).where(_rc.c.campana_id == bindparam("campaign_id"))


def learn_campana_estado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """Activated, paused or ended: only an active campaign validates conversions."""
    t = tables.ref_campanas
    session.execute(update(t).where(t.c.campana_id == event.payload["id"]).values(
        estado=_CAMPAIGN_STATE[event.event_type], updated_at=utcnow()))
    return []


def learn_inscripcion(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """AfiliadoInscrito: its link code now redirects and attributes to the affiliate and campaign."""
    p = event.payload
    i = tables.ref_inscripciones
    if not session.scalar(select(exists().where(i.c.link_code == p["link_code"]))):
        session.execute(i.insert().values(link_code=p["link_code"], inscripcion_id=p["inscripcion_id"],
                                          afiliado_id=p["afiliado_id"], campana_id=p["campana_id"], activa=True,
                                          updated_at=utcnow()))
    return []


def learn_inscripcion_estado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """InscripcionSuspendida / InscripcionReactivada: a suspended link neither redirects nor attributes."""
    i = tables.ref_inscripciones
    session.execute(update(i).where(i.c.inscripcion_id == event.payload["inscripcion_id"]).values(
        activa=event.event_type == "InscripcionReactivada", updated_at=utcnow()))
    return []


def learn_afiliado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """AfiliadoHabilitado: enabled for the first time, or again after a suspension. v2 carries the
    hash of the affiliate's email (self-referral check); v1 and a null hash keep what was known."""
    _learn_estado_afiliado(session, event.payload["afiliado_id"], AFILIADO_HABILITADO)
    if event.payload.get("email_sha256") is not None:
        t = tables.ref_afiliados
        session.execute(update(t).where(t.c.afiliado_id == event.payload["afiliado_id"]).values(
            email_sha256=event.payload["email_sha256"]))
    return []


def learn_afiliado_inhabilitado(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """AfiliadoInhabilitado: its new conversions are rejected until it is enabled again."""
    _learn_estado_afiliado(session, event.payload["afiliado_id"], AFILIADO_SUSPENDIDO)
    return []


def _learn_estado_afiliado(session: Session, afiliado_id: str, estado: str) -> None:
    t = tables.ref_afiliados
    if session.scalar(select(exists().where(t.c.afiliado_id == afiliado_id))):
        session.execute(update(t).where(t.c.afiliado_id == afiliado_id).values(estado=estado, updated_at=utcnow()))
    else:
        session.execute(t.insert().values(afiliado_id=afiliado_id, estado=estado, updated_at=utcnow()))
