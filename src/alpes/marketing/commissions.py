"""Commissions: what a validated conversion earns, marketing's answers in the conversion →
commission saga, reversal, approval, and the reads behind /comisiones. Plain functions over a session."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal

from sqlalchemy import ColumnElement, bindparam, exists, false, func, select, true, update
from sqlalchemy.orm import Session

from alpes.kernel.access import ADVERTISER, AFFILIATE, OPERATOR, SYSTEM, Principal
from alpes.kernel.db import Database, once_per_transaction, upsert_add, where_equal
from alpes.kernel.errors import NotFound
from alpes.kernel.messages import IncomingEvent, OutgoingEvent, new_id, utcnow
from alpes.kernel.outbox import Outbox

from . import campaigns, commission_rules, domain, tables
from .topics import COMISIONES, MARKETING


# -- marketing-consumer on conversiones.eventos: the conversion → commission saga ------------------
# Why no commission is booked for a validated conversion (ComisionDenegada.razon, kept in
# comisiones_denegadas so that asking again gets the same answer):
AFILIADO_SUSPENDIDO_DURANTE_PROCESO = "afiliado_suspendido_durante_proceso"
REEMBOLSADA_ANTES_DE_COMISION = "reembolsada_antes_de_comision"
CONVERSION_RECHAZADA = "conversion_rechazada"
COMPENSACION = "compensacion"  # ComisionRevertida.motivo of a commission undone by the saga


# Built once, values bound at execution: these run for every conversion, and building them per
# call cost SQLAlchemy more CPU than running them (issue 11).
_k, _d, _r, _a = tables.comisiones, tables.comisiones_denegadas, tables.conversiones_reembolsadas, tables.afiliados
_COMISION = select(_k).where(_k.c.conversion_id == bindparam("conversion_id"))
_COMISION_LOCKED = _COMISION.with_for_update()
# What answering the saga needs to know before booking, in one round trip: booked already? denied
# already (and why)? refunded first? the affiliate's state (marketing's view)?
_ANSWER_INPUTS = select(
    exists().where(_k.c.conversion_id == bindparam("conversion_id")).label("booked"),
    select(_d.c.razon).where(_d.c.conversion_id == bindparam("conversion_id")).scalar_subquery().label("razon"),
    exists().where(_r.c.conversion_id == bindparam("conversion_id")).label("refunded"),
    select(_a.c.estado).where(_a.c.afiliado_id == bindparam("affiliate_id")).scalar_subquery().label("estado"))
_BOOKED_OR_REFUNDED = select(exists().where(_k.c.conversion_id == bindparam("conversion_id")),
                             exists().where(_r.c.conversion_id == bindparam("conversion_id")))
_DENY = _d.insert()
_CAMPANA_LOCKED = select(tables.campanas).where(tables.campanas.c.id == bindparam("campana_id")).with_for_update()
# What the tier count and the caps and budget read: the running totals (tables.comisiones_por_dia,
# gasto_por_afiliado, gasto_por_campana: campaigns.gastado_de_campana), a few rows whatever the
# number of commissions.
_pd, _ga, _gc = tables.comisiones_por_dia, tables.gasto_por_afiliado, tables.gasto_por_campana
_DIAS_DEL_AFILIADO = (_pd.c.campana_id == bindparam("campana_id"), _pd.c.afiliado_id == bindparam("afiliado_id"),
                      _pd.c.dia >= bindparam("desde"), _pd.c.dia < bindparam("hasta"))
_APROBADAS_EN = select(func.coalesce(func.sum(_pd.c.no_revertidas), 0)).where(*_DIAS_DEL_AFILIADO)
_GASTADO_AFILIADO_EN = select(func.coalesce(func.sum(_pd.c.monto), 0)).where(*_DIAS_DEL_AFILIADO)
_GASTADO_AFILIADO = select(_ga.c.monto).where(_ga.c.campana_id == bindparam("campana_id"),
                                              _ga.c.afiliado_id == bindparam("afiliado_id"))
_BOOK = _k.insert()
_CERO = Decimal("0.00")


def answer_comision_request(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """ConversionValidated, or CommissionRequested (the saga asking again after a timeout): book the
    conversion's commission at most once and answer conversiones on marketing.eventos, keyed by the
    conversion, in this transaction: ComisionRegistrada (booked, maybe partial or zero by a cap, with
    limitado_por) or ComisionDenegada with its reason. Asked again, the same answer."""
    p = event.payload
    known = session.execute(_ANSWER_INPUTS, {"conversion_id": p["conversion_id"],
                                             "affiliate_id": p["affiliate_id"]}).one()
    if known.booked:
        return [_registrada(_comision_de(session, p["conversion_id"]))]
    razon = known.razon
    if razon is None:
        razon = _razon_para_denegar(bool(known.refunded), known.estado)
        if razon is not None:
            session.execute(_DENY, {"conversion_id": p["conversion_id"], "razon": razon, "denegada_en": utcnow()})
    if razon is not None:
        return [OutgoingEvent(MARKETING, "ComisionDenegada", p["conversion_id"], {
            "conversion_id": p["conversion_id"], "afiliado_id": p["affiliate_id"], "campana_id": p["campaign_id"],
            "razon": razon, "timestamp": utcnow()})]
    calculada, booked = _book_comision(session, event)
    return [calculada, _registrada(booked)]


def _razon_para_denegar(refunded: bool, estado_afiliado: str | None) -> str | None:
    """Why no commission is due although conversiones validated the conversion: it was refunded
    first, or the affiliate was suspended between the validation and now (marketing's view)."""
    if refunded:
        return REEMBOLSADA_ANTES_DE_COMISION
    if estado_afiliado == domain.INHABILITADO:
        return AFILIADO_SUSPENDIDO_DURANTE_PROCESO
    return None


def _comision_de(session: Session, conversion_id: str, *, lock: bool = False):
    """The conversion's commission row (None: none booked); `lock`: held until the transaction ends."""
    return session.execute(_COMISION_LOCKED if lock else _COMISION,
                           {"conversion_id": conversion_id}).mappings().first()


def _registrada(row) -> OutgoingEvent:
    return OutgoingEvent(MARKETING, "ComisionRegistrada", row["conversion_id"], {
        "comision_id": row["id"], "conversion_id": row["conversion_id"], "afiliado_id": row["afiliado_id"],
        "campana_id": row["campana_id"], "monto": row["monto"], "moneda": row["moneda"],
        "limitado_por": row["limitado_por"], "timestamp": utcnow()})


def undo_compensated_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """ConversionRejected with compensation=true (conversiones undid the validation): a commission
    booked for it (late: after the saga gave up) is reversed, and none is ever booked afterwards.
    Ordinary rejections never had a commission: nothing to do."""
    p = event.payload
    if not p.get("compensation"):
        return []
    d = tables.comisiones_denegadas
    if not session.scalar(select(exists().where(d.c.conversion_id == p["conversion_id"]))):
        session.execute(d.insert().values(conversion_id=p["conversion_id"], razon=CONVERSION_RECHAZADA,
                                          denegada_en=utcnow()))
    row = _comision_de(session, p["conversion_id"], lock=True)
    if row is None or row["estado"] == domain.REVERTIDA:
        return []
    return _revertir_comision(session, row, COMPENSACION, p["reason"], utcnow())


def reverse_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """ConversionRefunded → the conversion's commission is reversed, whatever its state, with a
    negative adjustment when it already went into a payout. The refund itself is remembered, so
    a commission arriving after it (or a conversion that never had one) is never booked."""
    p = event.payload
    r = tables.conversiones_reembolsadas
    if session.scalar(select(exists().where(r.c.conversion_id == p["conversion_id"]))):
        return []
    now = utcnow()
    session.execute(r.insert().values(conversion_id=p["conversion_id"], tipo=p["refund_type"], motivo=p["reason"],
                                      reembolsada_en=now))
    row = _comision_de(session, p["conversion_id"], lock=True)
    if row is None or row["estado"] == domain.REVERTIDA:
        return []
    return _revertir_comision(session, row, p["refund_type"], p["reason"], now)


def _revertir_comision(session: Session, row, motivo: str, detalle: str | None, now: datetime) -> list[OutgoingEvent]:
    """Reverse a booked commission (refund or compensation): ComisionRevertida, with a negative
    adjustment when it already went into a payout, and the saga's ReversionComisionRegistrada on
    marketing.eventos (keyed by the conversion), so conversiones logs the reversal step."""
    k = tables.comisiones
    reversion = domain.revertir(row["estado"], row["monto"], en_un_pago=row["pago_id"] is not None)
    ajuste_id = None
    if reversion.ajuste is not None:
        ajuste_id = new_id()
        session.execute(tables.ajustes.insert().values(
            id=ajuste_id, afiliado_id=row["afiliado_id"], comision_id=row["id"], monto=reversion.ajuste,
            moneda=row["moneda"], motivo=motivo, creado_en=now))
    session.execute(update(k).where(k.c.id == row["id"]).values(
        estado=domain.REVERTIDA, revertida_en=now, motivo_reversion=motivo))
    if row["momento_conversion"] is not None:
        # Under the campaign's lock, as a booking writes the same totals: on MariaDB every
        # transaction then takes the campaign's row before the totals' rows, in that order.
        _campana_locked(session, row["campana_id"])
        upsert_add(session, _pd, _dia_de(row), {"no_revertidas": -1, "monto": _CERO})
    return [OutgoingEvent(COMISIONES, "ComisionRevertida", row["id"], {
        "id": row["id"], "conversion_id": row["conversion_id"], "afiliado_id": row["afiliado_id"],
        "campana_id": row["campana_id"], "monto": row["monto"], "moneda": row["moneda"],
        "estado_anterior": reversion.estado_anterior, "motivo": motivo, "detalle": detalle,
        "ajuste_id": ajuste_id, "ajuste_monto": reversion.ajuste, "timestamp": now}),
        OutgoingEvent(MARKETING, "ReversionComisionRegistrada", row["conversion_id"], {
            "comision_id": row["id"], "conversion_id": row["conversion_id"], "monto": row["monto"],
            "moneda": row["moneda"], "estado_anterior": reversion.estado_anterior, "motivo": motivo,
            "detalle": detalle, "ajuste_monto": reversion.ajuste, "timestamp": now})]


# -- calculation: what a conversion earns under the rules in force when it happened ----------------
def calculate_comision(session: Session, event: IncomingEvent) -> list[OutgoingEvent]:
    """Book the commission of a validated conversion, at most once, and announce ComisionCalculada."""
    p = event.payload
    booked, refunded = session.execute(_BOOKED_OR_REFUNDED, {"conversion_id": p["conversion_id"]}).one()
    # Booked: the unique key on conversion_id guards races; this skips the common duplicate.
    # Refunded before its commission was booked: never booked.
    if booked or refunded:
        return []
    calculada, _row = _book_comision(session, event)
    return [calculada]


def _book_comision(session: Session, event: IncomingEvent) -> tuple[OutgoingEvent, dict]:
    """Book the commission of a validated conversion known to have none and not refunded: its
    ComisionCalculada, and the row as stored (what ComisionRegistrada tells the saga)."""
    p = event.payload
    # The campaign row is locked while its budget and caps are read and the commission booked:
    # two conversions of one campaign never both spend the same remaining budget (on SQLite the
    # write lock taken at BEGIN serializes them anyway).
    campana = _campana_locked(session, p["campaign_id"])
    if campana is None:
        raise LookupError(f"conversion {p['conversion_id']} names unknown campaign {p['campaign_id']}")
    # The rule version, the tier month and the cap periods are those of the conversion's time
    # (ConversionValidated v2 converted_at), not of its validation: a conversion held for review
    # and approved days later still earns what the rules in force when it happened said. v1
    # events carry only the validation time: that is the best we know.
    # In UTC: the periods are UTC days, weeks and months (domain.ventana_del_periodo).
    momento = (p.get("converted_at") or p["timestamp"]).astimezone(timezone.utc)
    calculo, explicacion = _calcular_con_reglas(session, campana, p, momento)
    comision_id = new_id()
    now = utcnow()
    row = {
        "id": comision_id, "conversion_id": p["conversion_id"], "afiliado_id": p["affiliate_id"],
        "campana_id": p["campaign_id"], "base": p["conversion_value"], "porcentaje": calculo.porcentaje,
        "monto": calculo.monto, "moneda": campana["moneda"], "estado": domain.PENDIENTE,
        "correlation_id": event.correlation_id, "calculada_en": now,
        "aprobable_desde": domain.aprobable_desde(now, campana["periodo_bloqueo_dias"]),
        "momento_conversion": momento, "version_reglas": calculo.version, "regla_id": calculo.regla_id,
        "tipo_regla": calculo.tipo, "limitado_por": calculo.limitado_por, "explicacion": json.dumps(explicacion),
        "click_id": p.get("click_id")}
    session.execute(_BOOK, row)
    _add_to_totals(session, row)
    return OutgoingEvent(COMISIONES, "ComisionCalculada", comision_id, {
        "id": comision_id, "conversion_id": p["conversion_id"], "afiliado_id": p["affiliate_id"],
        "campana_id": p["campaign_id"], "base": p["conversion_value"], "porcentaje": calculo.porcentaje,
        "monto": calculo.monto, "moneda": campana["moneda"], "timestamp": now, "regla_id": calculo.regla_id,
        "version_reglas": calculo.version, "limitado_por": calculo.limitado_por}), row


def _add_to_totals(session: Session, row: dict) -> None:
    """The booked commission in the running totals the next calculations read."""
    upsert_add(session, _pd, _dia_de(row), {"no_revertidas": 1, "monto": row["monto"]})
    upsert_add(session, _ga, {"campana_id": row["campana_id"], "afiliado_id": row["afiliado_id"]},
               {"monto": row["monto"]})
    upsert_add(session, _gc, {"campana_id": row["campana_id"]}, {"monto": row["monto"]})


def _dia_de(row) -> dict:
    """The comisiones_por_dia row a commission counts in: its campaign, affiliate and the UTC day of
    its conversion (booking and reversal must name the same one)."""
    return {"campana_id": row["campana_id"], "afiliado_id": row["afiliado_id"], "dia": row["momento_conversion"].date()}


def _campana_locked(session: Session, campana_id: str):
    """The campaign's row, locked until the commit; read once per transaction (a consumer's batch
    books many conversions of one campaign): every change to a campaign locks its row first
    (campaigns.owned_campana, which drops this copy), so none can happen before this transaction ends."""
    return once_per_transaction(session, campaigns.kept_campana_key(campana_id), lambda s: s.execute(
        _CAMPANA_LOCKED, {"campana_id": campana_id}).mappings().first())


def _versiones(session: Session, campana_id: str) -> list[domain.ConjuntoReglas]:
    """The campaign's rule versions, read once per transaction, after its row was locked: a new
    version is written under that lock (commission_rules.replace_reglas), so none can appear
    before this transaction ends."""
    return once_per_transaction(session, campaigns.kept_reglas_key(campana_id),
                                lambda s: commission_rules.load_versiones(s, campana_id))


def _calcular_con_reglas(session: Session, campana, p: dict, momento: datetime) -> tuple[domain.Calculo, dict]:
    """Gather what the rules need (version in force, tier count, what the caps have left) and
    apply them. Spent = every commission booked in the campaign, reversed ones included: a
    reversal does not give budget back (the money may already have been paid).

    Tier count ("the affiliate's approved conversions in the period"): the affiliate's commissions
    in this campaign whose conversion happened in this conversion's calendar month and was
    validated (a commission is booked only for a validated conversion: rejected or held ones have
    none), excluding reversed ones (refunded or charged back: no longer approved). A commission a
    cap cut to zero still counts: its conversion was approved."""
    conjunto = domain.version_vigente(_versiones(session, campana["id"]), momento)
    del_afiliado = {"campana_id": campana["id"], "afiliado_id": p["affiliate_id"]}
    # int(): MariaDB sums integers as DECIMAL.
    aprobadas_en_el_mes = int(session.scalar(_APROBADAS_EN, {**del_afiliado, **_dias("mes", momento)}))
    restante_afiliado = None
    tope = conjunto.tope_por_afiliado if conjunto else None
    if tope is not None:
        if tope.periodo == "total":
            gastado_afiliado = session.scalar(_GASTADO_AFILIADO, del_afiliado) or _CERO
        else:
            gastado_afiliado = session.scalar(_GASTADO_AFILIADO_EN, {**del_afiliado, **_dias(tope.periodo, momento)})
        restante_afiliado = tope.monto - gastado_afiliado
    restante_presupuesto = None
    if campana["presupuesto"] is not None:
        restante_presupuesto = campana["presupuesto"] - campaigns.gastado_de_campana(session, campana["id"])
    conversion = domain.ConversionACalcular(p["conversion_value"], p["conversion_type"], p["affiliate_id"],
                                            aprobadas_en_el_mes)
    calculo = domain.calcular(conjunto, campana["porcentaje_comision"], conversion, restante_afiliado,
                              restante_presupuesto)
    explicacion = {
        "inputs": {"base": str(conversion.base), "conversion_type": conversion.conversion_type,
                   "momento_conversion": momento.isoformat(), "aprobadas_en_el_mes": aprobadas_en_el_mes,
                   "porcentaje": str(calculo.porcentaje) if calculo.tipo == domain.CPS else None,
                   "monto_fijo": str(calculo.monto_fijo) if calculo.monto_fijo is not None else None},
        "chequeos": list(calculo.chequeos),
        "topes": {"tope_por_afiliado": {"monto": str(tope.monto), "periodo": tope.periodo} if tope else None,
                  "restante_afiliado": _str_or_none(restante_afiliado),
                  "presupuesto": _str_or_none(campana["presupuesto"]),
                  "restante_presupuesto": _str_or_none(restante_presupuesto)},
        "monto_sin_tope": str(calculo.monto_sin_tope)}
    return calculo, explicacion


def _dias(periodo: str, momento: datetime) -> dict:
    """The UTC days [desde, hasta) of the bounded period holding `momento`, as comisiones_por_dia keys them."""
    desde, hasta = domain.ventana_del_periodo(periodo, momento)
    return {"desde": desde.date(), "hasta": hasta.date()}


def _str_or_none(value) -> str | None:
    return None if value is None else str(value)


# -- approval: pending commissions past their lock period ------------------------------------------
def approve_due_comisiones(db: Database, outbox: Outbox, now: datetime | None = None, batch: int = 200) -> int:
    """The approval scheduler (the broker has no delayed delivery): every pending commission
    whose lock period has passed becomes approved, each with its ComisionAprobada."""
    k = tables.comisiones
    now = now or utcnow()
    with db.transaction() as session:
        rows = session.execute(
            select(k).where(k.c.estado == domain.PENDIENTE, k.c.aprobable_desde <= now)
            .order_by(k.c.aprobable_desde, k.c.id).limit(batch).with_for_update(skip_locked=True)).mappings().all()
        events = []
        for row in rows:
            session.execute(update(k).where(k.c.id == row["id"]).values(estado=domain.APROBADA, aprobada_en=now))
            events.append(OutgoingEvent(COMISIONES, "ComisionAprobada", row["id"], {
                "id": row["id"], "conversion_id": row["conversion_id"], "afiliado_id": row["afiliado_id"],
                "campana_id": row["campana_id"], "monto": row["monto"], "moneda": row["moneda"],
                "calculada_en": row["calculada_en"], "timestamp": now}, correlation_id=row["correlation_id"]))
        outbox.add(session, events)
    return len(rows)


# -- tenancy: what each caller may read of the money ------------------------------------------------
def campanas_de(anunciante_id: str | None):
    """The ids of the advertiser's campaigns, as a subquery (campanas.anunciante_id is set at
    creation and never changes: null = an operator's campaign)."""
    c = tables.campanas
    # Never `anunciante_id == None`: SQL would read IS NULL and hand a key without its advertiser
    # the operator's campaigns.
    return select(c.c.id).where(c.c.anunciante_id == anunciante_id if anunciante_id else false())


def de_sus_campanas(campana_id: ColumnElement) -> Callable[[str], ColumnElement]:
    """For `rows_visible_to`: a row is an advertiser's when its campaign is."""
    return lambda anunciante_id: campana_id.in_(campanas_de(anunciante_id))


def rows_visible_to(principal: Principal, afiliado_id: ColumnElement,
                    del_anunciante: Callable[[str], ColumnElement]) -> ColumnElement:
    """The condition keeping a read to the caller's tenant: an operator (or the platform itself)
    sees every row, an advertiser the rows `del_anunciante` says are its own, an affiliate the rows
    of `afiliado_id`; anyone else, or a key missing its tenant, nothing."""
    if principal.role in (OPERATOR, SYSTEM):
        return true()
    if principal.role == ADVERTISER and principal.anunciante_id:
        return del_anunciante(principal.anunciante_id)
    if principal.role == AFFILIATE and principal.afiliado_id:
        return afiliado_id == principal.afiliado_id
    return false()


def _visible(principal: Principal) -> ColumnElement:
    k = tables.comisiones
    return rows_visible_to(principal, k.c.afiliado_id, de_sus_campanas(k.c.campana_id))


# -- reads behind /comisiones: none carries customer data (no user, address or email hash is kept) --
def get_comision(session: Session, comision_id: str, principal: Principal):
    """The commission's row; NotFound for an unknown id or one of another tenant."""
    k = tables.comisiones
    row = session.execute(select(k).where(k.c.id == comision_id, _visible(principal))).mappings().first()
    if row is None:
        raise NotFound("comision_id", "no commission with this id")
    return row


def list_comisiones(session: Session, principal: Principal, limit: int, offset: int, **filters) -> list:
    """Oldest first, the caller's only; `filters`: afiliado_id, campana_id, conversion_id (None: any)."""
    k = tables.comisiones
    query = select(k).where(_visible(principal)).order_by(k.c.calculada_en, k.c.id).limit(limit).offset(offset)
    return session.execute(where_equal(query, k, **filters)).mappings().all()


def explain_comision(session: Session, comision_id: str, principal: Principal) -> dict:
    """How the commission was computed: rule and version, inputs, checks, caps, amount."""
    row = get_comision(session, comision_id, principal)
    lineage = json.loads(row["explicacion"]) if row["explicacion"] else {
        "inputs": {"base": str(row["base"]), "porcentaje": str(row["porcentaje"])}, "chequeos": [], "topes": None,
        "monto_sin_tope": None}  # booked before commission rules: base × the campaign percentage
    return {"comision_id": row["id"], "conversion_id": row["conversion_id"],
            "click_id": row["click_id"],  # from ConversionValidated v2; null: attributed by ids, or older
            "campana_id": row["campana_id"], "afiliado_id": row["afiliado_id"],
            "version_reglas": row["version_reglas"], "regla_id": row["regla_id"], "tipo": row["tipo_regla"],
            **lineage, "limitado_por": row["limitado_por"], "monto": str(row["monto"]), "moneda": row["moneda"]}
