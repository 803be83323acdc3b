"""Commission rules: each campaign's versioned rule sets, stored, replaced and shown."""

from __future__ import annotations

import json
from decimal import Decimal

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from alpes.kernel.access import AFFILIATE, Principal
from alpes.kernel.errors import Conflict, NotFound
from alpes.kernel.messages import OutgoingEvent, utcnow

from . import campaigns, domain, tables
from .topics import MARKETING


# Built once, values bound at execution: read for every commission booked (issue 11).
_VERSIONES = select(tables.reglas_comision).where(tables.reglas_comision.c.campana_id == bindparam("campana_id")) \
    .order_by(tables.reglas_comision.c.version)


def load_versiones(session: Session, campana_id: str) -> list[domain.ConjuntoReglas]:
    return [_conjunto(row) for row in session.execute(_VERSIONES, {"campana_id": campana_id}).mappings()]


def replace_reglas(session: Session, campana_id: str, reglas: tuple[domain.Regla, ...],
                   tope: domain.Tope | None, *, caller: Principal) -> tuple[int, list[OutgoingEvent]]:
    """A new version of the campaign's rules, in force from now; earlier versions are kept and
    still govern the conversions of their time. Only the campaign's owner or an operator sets
    them (NotFound for anyone else's campaign: an affiliate never writes its own rate)."""
    r = tables.reglas_comision
    estado = campaigns.owned_campana(session, caller, campana_id, lock=True)["estado"]
    if estado == domain.FINALIZADA:
        raise Conflict("estado", "a finished campaign's commission rules cannot change")
    version = (session.scalar(select(func.max(r.c.version)).where(r.c.campana_id == campana_id)) or 0) + 1
    now = utcnow()
    texto = json.dumps(_reglas_json(reglas))
    session.execute(r.insert().values(campana_id=campana_id, version=version, vigente_desde=now, reglas=texto,
                                      tope_monto=tope.monto if tope else None,
                                      tope_periodo=tope.periodo if tope else None))
    return version, [OutgoingEvent(MARKETING, "ReglasComisionActualizadas", campana_id, {
        "campana_id": campana_id, "version": version, "reglas": texto, "timestamp": now})]


def show_reglas(session: Session, campana_id: str, version: int | None, *, caller: Principal) -> dict:
    """A version of the campaign's rules (None: the newest). Version 0 is the campaign's flat
    percentage, in force from its creation until the first version. NotFound for an unknown
    campaign or version, or a campaign the caller cannot see (an affiliate: one it is not enrolled
    in). An affiliate sees the rules for everyone and its own overrides, not other affiliates' deals."""
    campana = campaigns.visible_campana(session, caller, campana_id)
    versiones = {v.version: v for v in load_versiones(session, campana_id)}
    version = max(versiones, default=0) if version is None else version
    porcentaje = str(campana["porcentaje_comision"])
    if version == 0:
        return {"campana_id": campana_id, "version": 0, "vigente_desde": campana["creada_en"].isoformat(),
                "versiones": sorted(versiones), "reglas": [], "tope_por_afiliado": None,
                "porcentaje_comision": porcentaje}
    if version not in versiones:
        raise NotFound("version", "no rule set with this version")
    conjunto = versiones[version]
    tope = conjunto.tope_por_afiliado
    reglas = _reglas_json(conjunto.reglas)
    if caller.role == AFFILIATE:
        reglas = [r for r in reglas if r["afiliado_id"] in (None, caller.afiliado_id)]
    return {"campana_id": campana_id, "version": version, "vigente_desde": conjunto.vigente_desde.isoformat(),
            "versiones": sorted(versiones), "reglas": reglas,
            "tope_por_afiliado": {"monto": str(tope.monto), "periodo": tope.periodo} if tope else None,
            "porcentaje_comision": porcentaje}


def _reglas_json(reglas: tuple[domain.Regla, ...]) -> list[dict]:
    """The rules as stored and published: each named by its position (r1, r2...), amounts as text."""
    return [{"id": domain.regla_id(posicion), "tipo": regla.tipo, "monto": _str_or_none(regla.monto),
             "porcentaje": _str_or_none(regla.porcentaje), "conversion_type": regla.conversion_type,
             "afiliado_id": regla.afiliado_id, "min_aprobadas": regla.min_aprobadas}
            for posicion, regla in enumerate(reglas, start=1)]


def _conjunto(row) -> domain.ConjuntoReglas:
    reglas = tuple(domain.Regla(r["tipo"], Decimal(r["monto"]) if r["monto"] is not None else None,
                                Decimal(r["porcentaje"]) if r["porcentaje"] is not None else None,
                                r["conversion_type"], r["afiliado_id"], r["min_aprobadas"])
                   for r in json.loads(row["reglas"]))
    tope = domain.Tope(row["tope_monto"], row["tope_periodo"]) if row["tope_monto"] is not None else None
    return domain.ConjuntoReglas(row["version"], row["vigente_desde"], reglas, tope)


def _str_or_none(value) -> str | None:
    return None if value is None else str(value)
