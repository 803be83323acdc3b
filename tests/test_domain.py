"""Domain rules, with no database and no broker."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpes.afiliados import domain as afiliados
from alpes.auditoria import domain as auditoria
from alpes.conversiones import domain as conversiones
from alpes.marketing import domain as marketing

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


# -- afiliados: automatic validation ---------------------------------------------------------
@pytest.mark.parametrize("email, nombre, duplicate, expected", [
    ("ana@example.com", "Ana", False, []),
    ("ana@mailinator.com", "Ana", False, ["email_desechable"]),
    ("not-an-email", "Ana", False, ["email_invalido"]),
    ("ana@example.com", "1", False, ["nombre_invalido"]),
    ("ana@example.com", "Ana", True, ["cuenta_duplicada"]),
    ("x@yopmail.com", "--", True, ["email_desechable", "nombre_invalido", "cuenta_duplicada"]),
])
def test_affiliate_validation_rules(email, nombre, duplicate, expected):
    solicitud = afiliados.SolicitudRegistro("u1", email, nombre)
    assert afiliados.motivos_de_rechazo(solicitud, duplicate) == expected


# -- marketing: commission arithmetic ---------------------------------------------------------
def test_commission_examples():
    assert marketing.calcular_comision(Decimal("99.99"), Decimal("12.5")) == Decimal("12.50")
    assert marketing.calcular_comision(Decimal("0.05"), Decimal("10")) == Decimal("0.01")  # 0.005 rounds half up
    assert marketing.calcular_comision(Decimal("0.04"), Decimal("10")) == Decimal("0.00")
    assert marketing.calcular_comision(Decimal("100.00"), Decimal("0")) == Decimal("0.00")
    with pytest.raises(ValueError):
        marketing.calcular_comision(Decimal("-1"), Decimal("10"))
    with pytest.raises(ValueError):
        marketing.calcular_comision(Decimal("1"), Decimal("100.01"))


@settings(max_examples=500)
@given(base=st.decimals(min_value=0, max_value=Decimal("9999999999999.99"), places=2),
       pct=st.decimals(min_value=0, max_value=100, places=4))
def test_commission_is_exact_rounded_and_bounded(base, pct):
    monto = marketing.calcular_comision(base, pct)
    assert isinstance(monto, Decimal)
    assert monto.as_tuple().exponent == -2
    exact = base * pct / 100  # exact in Decimal at these sizes
    assert abs(monto - exact) <= Decimal("0.005")
    assert monto == exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    assert Decimal(0) <= monto <= base


# -- conversiones: the event-sourced aggregate and its validation -------------------------------
def _detected(currency="EUR", at=NOW) -> conversiones.Conversion:
    return conversiones.Conversion.rebuild([conversiones.Detected(
        "c1", "a1", "k1", "u1", Decimal("10.00"), "sale", "o1", currency, at)])


GRACE = timedelta(seconds=10)
KNOWN = conversiones.Reference(affiliate_enabled=True, campaign_active=True, campaign_currency="EUR")


def test_rebuild_folds_events():
    conversion = _detected()
    assert (conversion.id, conversion.status, conversion.version) == ("c1", "detected", 1)
    conversion.apply(conversiones.Rejected("affiliate_unknown", NOW))
    assert (conversion.status, conversion.reason, conversion.version) == ("rejected", "affiliate_unknown", 2)


def test_known_references_validate_at_once():
    decision = conversiones.decide_validation(_detected(), KNOWN, NOW, GRACE)
    assert [type(e) for e in decision.events] == [conversiones.Validated]


@pytest.mark.parametrize("ref, reason", [
    (conversiones.Reference(None, True, "EUR"), "affiliate_unknown"),
    (conversiones.Reference(True, None, None), "campaign_unknown"),
])
def test_unknown_references_wait_for_the_grace_period_then_reject(ref, reason):
    assert conversiones.decide_validation(_detected(), ref, NOW + GRACE / 2, GRACE).pending
    decision = conversiones.decide_validation(_detected(), ref, NOW + GRACE, GRACE)
    assert decision.events == [conversiones.Rejected(reason, NOW + GRACE)]


@pytest.mark.parametrize("ref, currency, reason", [
    (conversiones.Reference(False, True, "EUR"), "EUR", "affiliate_unknown"),
    (conversiones.Reference(True, False, "EUR"), "EUR", "campaign_inactive"),
    (KNOWN, "USD", "currency_mismatch"),
])
def test_clear_violations_reject_at_once(ref, currency, reason):
    decision = conversiones.decide_validation(_detected(currency), ref, NOW, GRACE)
    assert [e.reason for e in decision.events] == [reason]


def test_a_decided_conversion_is_not_decided_again():
    conversion = _detected()
    conversion.apply(conversiones.Validated(NOW))
    assert conversiones.decide_validation(conversion, KNOWN, NOW, GRACE).events == []


# -- auditoria: the hash chain --------------------------------------------------------------------
def _chain(n: int) -> list[tuple[auditoria.AuditRecord, str, str]]:
    out, prev = [], auditoria.GENESIS
    for seq in range(1, n + 1):
        record = auditoria.AuditRecord(seq, f"e{seq}", "t", "X", 1, f"a{seq % 3}", NOW, "c", "c",
                                       json.dumps({"n": seq}))
        digest = auditoria.chain_hash(prev, record)
        out.append((record, prev, digest))
        prev = digest
    return out


def test_an_intact_chain_verifies():
    assert auditoria.verify_chain(_chain(20)) is None


def test_editing_a_record_breaks_its_link():
    chain = _chain(10)
    record, prev, digest = chain[4]
    chain[4] = (auditoria.AuditRecord(**{**record.__dict__, "payload_json": json.dumps({"n": 999})}), prev, digest)
    assert auditoria.verify_chain(chain) == auditoria.BrokenLink(5, "record content does not match its hash")


def test_deleting_or_reordering_records_is_detected():
    chain = _chain(10)
    assert auditoria.verify_chain(chain[:3] + chain[4:]).seq == 4
    swapped = chain[:2] + [chain[3], chain[2]] + chain[4:]
    assert auditoria.verify_chain(swapped).seq == 3


def test_rehashing_an_edited_record_still_breaks_the_next_link():
    chain = _chain(5)
    record, prev, _ = chain[1]
    edited = auditoria.AuditRecord(**{**record.__dict__, "payload_json": json.dumps({"n": -1})})
    chain[1] = (edited, prev, auditoria.chain_hash(prev, edited))
    assert auditoria.verify_chain(chain) == auditoria.BrokenLink(3, "previous-hash link does not match the record before it")
