"""The running totals a commission's calculation reads (tier count, cap and budget sums) are
exactly what the commissions booked and reversed say, on SQLite and MariaDB, including those
booked before the totals existed (migration 0018)."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from sqlalchemy import MetaData, Table, create_engine, select
from test_commission_lifecycle import _incoming

from alpes.kernel.access import SYSTEM_PRINCIPAL
from alpes.kernel.db import Database, migrate
from alpes.kernel.messages import new_id, utcnow
from alpes.marketing import campaigns, commission_rules, commissions, domain
from alpes.marketing import tables as marketing_tables

_k = marketing_tables.comisiones


def _totals(session) -> tuple[dict, dict, dict]:
    pd, ga, gc = (marketing_tables.comisiones_por_dia, marketing_tables.gasto_por_afiliado,
                  marketing_tables.gasto_por_campana)
    return ({(r.campana_id, r.afiliado_id, r.dia): (r.no_revertidas, r.monto) for r in session.execute(select(pd))},
            {(r.campana_id, r.afiliado_id): r.monto for r in session.execute(select(ga))},
            {r.campana_id: r.monto for r in session.execute(select(gc))})


def _totals_from_commissions(rows) -> tuple[dict, dict, dict]:
    """What the totals must hold, from the commissions themselves (UTC day of the conversion)."""
    por_dia: dict = {}
    por_afiliado: dict = {}
    por_campana: dict = {}
    for r in rows:
        if r["momento_conversion"] is not None:
            key = (r["campana_id"], r["afiliado_id"], r["momento_conversion"].astimezone(timezone.utc).date())
            count, monto = por_dia.get(key, (0, Decimal("0.00")))
            por_dia[key] = (count + (r["estado"] != domain.REVERTIDA), monto + r["monto"])
        key = (r["campana_id"], r["afiliado_id"])
        por_afiliado[key] = por_afiliado.get(key, Decimal("0.00")) + r["monto"]
        por_campana[r["campana_id"]] = por_campana.get(r["campana_id"], Decimal("0.00")) + r["monto"]
    return por_dia, por_afiliado, por_campana


def test_each_calculation_reads_what_the_commissions_booked_before_it_say(db_url):
    """Random bookings (conversion times over three UTC months, some given in another time zone)
    and reversals (refunds, compensations) in two campaigns: each commission's explanation counts
    the affiliate's unreversed commissions of its month and what its cap and the budget have left
    exactly as the commissions stored before it say, and the totals end equal to the commissions'."""
    migrate(db_url, "alpes.marketing:migrations")
    db = Database(db_url)
    rng = random.Random(20261206)
    try:
        with db.transaction() as session:
            tiered, _ = campaigns.create_campana(session, SYSTEM_PRINCIPAL, domain.NuevaCampana(
                "Escalonada", Decimal("10"), "EUR"))
            budgeted, _ = campaigns.create_campana(session, SYSTEM_PRINCIPAL, domain.NuevaCampana(
                "Con presupuesto", Decimal("10"), "EUR", presupuesto=Decimal("400.00")))
            commission_rules.replace_reglas(session, tiered, (
                domain.Regla("cps", porcentaje=Decimal("20"), min_aprobadas=3), domain.Regla("cps", porcentaje=Decimal("5"))),
                domain.Tope(Decimal("60.00"), "semana"), caller=SYSTEM_PRINCIPAL)
            commission_rules.replace_reglas(session, budgeted, (domain.Regla("cps", porcentaje=Decimal("10")),),
                                            domain.Tope(Decimal("90.00"), "total"), caller=SYSTEM_PRINCIPAL)
        start = utcnow() + timedelta(minutes=1)  # after both rule versions
        reglas = {tiered: ("semana", Decimal("60.00")), budgeted: ("total", Decimal("90.00"))}
        booked: list[str] = []
        for _ in range(90):
            if booked and rng.random() < 0.25:
                conversion_id = rng.choice(booked)
                if rng.random() < 0.5:
                    handler, event_type = commissions.reverse_comision, "ConversionRefunded"
                    payload = {"refund_type": "reembolso", "reason": "devuelto"}
                else:
                    handler, event_type = commissions.undo_compensated_comision, "ConversionRejected"
                    payload = {"compensation": True, "reason": "fraude"}
                payload.update({"conversion_id": conversion_id, "affiliate_id": "-", "campaign_id": "-",
                                "conversion_value": Decimal("1.00"), "currency": "EUR", "timestamp": start})
                with db.transaction() as session:
                    handler(session, _incoming("conversiones.eventos", event_type, conversion_id, payload))
                continue
            campana, afiliado = rng.choice([tiered, budgeted]), rng.choice(["a1", "a2", "a3"])
            momento = start + timedelta(minutes=rng.randrange(0, 60 * 24 * 80))
            zone = timezone(timedelta(hours=rng.choice([0, 0, 9, -7])))
            conversion_id = new_id()
            payload = {"conversion_id": conversion_id, "affiliate_id": afiliado, "campaign_id": campana,
                       "conversion_value": Decimal(rng.randrange(100, 30000)) / 100, "currency": "EUR",
                       "conversion_type": "sale", "timestamp": start, "click_id": None,
                       "converted_at": momento.astimezone(zone)}
            mes = domain.ventana_del_periodo("mes", momento)
            periodo, tope = reglas[campana]
            ventana = domain.ventana_del_periodo(periodo, momento)
            with db.transaction() as session:
                before = session.execute(select(_k).where(_k.c.campana_id == campana)).mappings().all()
                commissions.answer_comision_request(session, _incoming(
                    "conversiones.eventos", "ConversionValidated", conversion_id, payload))
                row = session.execute(select(_k).where(_k.c.conversion_id == conversion_id)).mappings().one()
            del_afiliado = [r for r in before if r["afiliado_id"] == afiliado]
            explain = json.loads(row["explicacion"])
            assert explain["inputs"]["aprobadas_en_el_mes"] == sum(
                1 for r in del_afiliado if mes[0] <= r["momento_conversion"] < mes[1] and r["estado"] != domain.REVERTIDA)
            gastado = sum((r["monto"] for r in del_afiliado
                           if ventana[0] is None or ventana[0] <= r["momento_conversion"] < ventana[1]), Decimal("0.00"))
            assert Decimal(explain["topes"]["restante_afiliado"]) == tope - gastado
            if campana == budgeted:
                spent = sum((r["monto"] for r in before), Decimal("0.00"))
                assert Decimal(explain["topes"]["restante_presupuesto"]) == Decimal("400.00") - spent
            booked.append(conversion_id)
        with db.transaction() as session:
            rows = session.execute(select(_k)).mappings().all()
            assert _totals(session) == _totals_from_commissions(rows)
        assert sum(1 for r in rows if r["estado"] == domain.REVERTIDA) >= 5
        assert any(r["limitado_por"] for r in rows) and any(r["regla_id"] == "r1" for r in rows)  # caps and tier hit
    finally:
        db.dispose()


def test_the_migration_fills_the_totals_from_the_commissions_booked_before_it(db_url):
    """Commissions booked before revision 0018 (reversed ones, and old rows without a conversion
    time, among them) are in the totals it creates, and the next booking counts them."""
    migrate(db_url, "alpes.marketing:migrations", "0017_comisiones_topes_covering")
    before = Database(db_url)
    try:
        with before.transaction() as session:  # the campaigns table is as 0017 left it
            k1, _ = campaigns.create_campana(session, SYSTEM_PRINCIPAL, domain.NuevaCampana(
                "Antigua", Decimal("10"), "EUR", presupuesto=Decimal("50.00")))
    finally:
        before.dispose()
    engine = create_engine(db_url)
    old = Table("comisiones", MetaData(), autoload_with=engine)
    dec = datetime(2026, 12, 31, 23, 30, tzinfo=timezone.utc)
    rows = [(k1, "a1", dec, "pendiente", "10.00"), (k1, "a1", dec, "revertida", "2.50"),
            (k1, "a1", dec + timedelta(hours=1), "aprobada", "3.25"), (k1, "a2", dec, "pagada", "7.00"),
            ("k2", "a1", None, "aprobada", "100.00"), ("k2", "a1", dec - timedelta(days=40), "revertida", "1.00")]
    with engine.begin() as connection:
        for campana, afiliado, momento, estado, monto in rows:
            connection.execute(old.insert().values(
                id=new_id(), conversion_id=new_id(), afiliado_id=afiliado, campana_id=campana, base=10000,
                porcentaje=100000, monto=int(Decimal(monto) * 100), moneda="EUR", estado=estado, correlation_id=new_id(),
                calculada_en=dec.replace(tzinfo=None),
                momento_conversion=momento.replace(tzinfo=None) if momento else None))
    engine.dispose()
    migrate(db_url, "alpes.marketing:migrations")
    db = Database(db_url)
    try:
        with db.transaction() as session:
            por_dia, por_afiliado, por_campana = _totals(session)
        day = datetime(2026, 12, 31).date()
        assert por_dia == {(k1, "a1", day): (1, Decimal("12.50")), (k1, "a1", datetime(2027, 1, 1).date()):
                           (1, Decimal("3.25")), (k1, "a2", day): (1, Decimal("7.00")),
                           ("k2", "a1", datetime(2026, 11, 21).date()): (0, Decimal("1.00"))}
        assert por_afiliado == {(k1, "a1"): Decimal("15.75"), (k1, "a2"): Decimal("7.00"),
                                ("k2", "a1"): Decimal("101.00")}
        assert por_campana == {k1: Decimal("22.75"), "k2": Decimal("101.00")}
        conversion_id = new_id()
        payload = {"conversion_id": conversion_id, "affiliate_id": "a1", "campaign_id": k1,
                   "conversion_value": Decimal("100.00"), "currency": "EUR", "conversion_type": "sale",
                   "timestamp": dec, "click_id": None, "converted_at": dec}
        with db.transaction() as session:
            commissions.answer_comision_request(session, _incoming(
                "conversiones.eventos", "ConversionValidated", conversion_id, payload))
            explain = json.loads(session.scalar(select(_k.c.explicacion).where(_k.c.conversion_id == conversion_id)))
        # December's unreversed one of a1 (not January's, not the reversed one); 50.00 - 22.75 left.
        assert explain["inputs"]["aprobadas_en_el_mes"] == 1
        assert explain["topes"]["restante_presupuesto"] == "27.25"
    finally:
        db.dispose()
