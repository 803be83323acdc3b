"""Affiliate validation holes (issue 10, hole 8): disposable subdomains, the same document under
another type, a duplicate email that must not be told apart from a new one, and the seam where
roles will decide who may override a duplicate rejection."""

from __future__ import annotations

from importlib import import_module

import pytest
from fastapi.testclient import TestClient

from alpes.afiliados import domain
from alpes.kernel.errors import Conflict
from alpes.settings import Settings

FULL = {"user_id": "u1", "email": "ana@example.com", "nombre": "Ana Pérez", "tipo_documento": "CC",
        "numero_documento": "AB12345", "pais": "CO", "metodo_pago": "paypal"}


@pytest.fixture
def afiliados(tmp_path):
    settings = Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1")
    app, runtime = import_module("alpes.afiliados.service").build(settings)
    yield TestClient(app), runtime
    runtime.db.dispose()


def _validate(runtime) -> None:
    next(job for job in runtime.jobs if job.name == "validate-afiliados").run()


@pytest.mark.parametrize("email", ["x@mailinator.com", "x@eu.mailinator.com", "x@a.b.MAILINATOR.com",
                                   "x@mx.yopmail.com"])
def test_disposable_domains_and_their_subdomains_are_rejected(email):
    assert domain.motivos_de_rechazo(domain.SolicitudRegistro("u", email, "Ana"), False) == ["email_desechable"]


@pytest.mark.parametrize("email", ["x@notmailinator.com", "x@mailinator.com.example.org", "x@example.com"])
def test_lookalike_domains_are_not_disposable(email):
    assert domain.motivos_de_rechazo(domain.SolicitudRegistro("u", email, "Ana"), False) == []


def test_the_same_number_under_another_document_type_is_a_duplicate(afiliados):
    client, runtime = afiliados
    first = client.post("/afiliados", json=FULL).json()["id"]
    other_type = client.post("/afiliados", json={**FULL, "user_id": "u2", "email": "dos@example.com",
                                                 "tipo_documento": "PASAPORTE",
                                                 "numero_documento": "ab12345"}).json()["id"]
    _validate(runtime)
    assert client.get(f"/afiliados/{first}").json()["estado"] == "validado"
    rejected = client.get(f"/afiliados/{other_type}").json()
    assert (rejected["estado"], rejected["motivos"]) == ("rechazado", ["documento_duplicado"])


def test_a_duplicate_email_is_answered_like_a_new_one_then_rejected(afiliados):
    client, runtime = afiliados
    first = client.post("/afiliados", json={"user_id": "u1", "email": "a@b.co", "nombre": "Ana"})
    _validate(runtime)
    fresh = client.post("/afiliados", json={"user_id": "u3", "email": "c@d.co", "nombre": "Cia"})
    duplicate = client.post("/afiliados", json={"user_id": "u2", "email": " A@B.co", "nombre": "Bea"})
    # Nothing in the answer tells a taken address from a free one.
    assert duplicate.status_code == fresh.status_code == first.status_code == 201, duplicate.text
    assert set(duplicate.json()) == set(fresh.json())
    assert duplicate.json()["estado"] == fresh.json()["estado"] == "registrado"
    assert duplicate.json()["id"] not in (first.json()["id"], fresh.json()["id"])
    _validate(runtime)
    rejected = client.get(f"/afiliados/{duplicate.json()['id']}").json()
    assert (rejected["estado"], rejected["motivos"]) == ("rechazado", ["cuenta_duplicada"])
    assert client.get(f"/afiliados/{fresh.json()['id']}").json()["estado"] == "validado"
    assert client.get(f"/afiliados/{first.json()['id']}").json()["estado"] == "validado"


def test_two_registrations_with_one_email_in_one_batch_the_first_wins(afiliados):
    client, runtime = afiliados
    first = client.post("/afiliados", json={"user_id": "u1", "email": "a@b.co", "nombre": "Ana"}).json()["id"]
    second = client.post("/afiliados", json={"user_id": "u2", "email": "a@b.co", "nombre": "Ana"}).json()["id"]
    _validate(runtime)
    assert client.get(f"/afiliados/{first}").json()["estado"] == "validado"
    assert client.get(f"/afiliados/{second}").json()["motivos"] == ["cuenta_duplicada"]


def test_an_email_whose_holder_was_rejected_may_register_again(afiliados):
    client, runtime = afiliados
    bad = client.post("/afiliados", json={"user_id": "u1", "email": "a@b.co", "nombre": "1"}).json()["id"]
    _validate(runtime)
    assert client.get(f"/afiliados/{bad}").json()["motivos"] == ["nombre_invalido"]
    again = client.post("/afiliados", json={"user_id": "u1", "email": "a@b.co", "nombre": "Ana"}).json()["id"]
    _validate(runtime)
    assert client.get(f"/afiliados/{again}").json()["estado"] == "validado"


# -- who may override a rejection (the route passes the caller's role: afiliados/tenancy.py) ---------------
@pytest.mark.parametrize("principal, motivos, allowed", [
    ("operador", ["cuenta_duplicada"], True),
    ("operador", ["documento_duplicado"], True),
    ("operador", ["email_desechable"], True),
    ("anunciante", ["email_desechable"], True),
    ("anunciante", ["nombre_invalido", "cuenta_duplicada"], False),
    ("anunciante", ["documento_duplicado"], False),
    ("afiliado", ["email_desechable"], False),
    ("desconocido", [], False),
])
def test_only_an_operator_may_override_a_duplicate_rejection(principal, motivos, allowed):
    assert domain.may_override_rejection(principal, motivos) is allowed


def test_approving_checks_the_seam(afiliados):
    from sqlalchemy import update

    from alpes.afiliados import handlers, tables
    from alpes.kernel.access import Principal

    client, runtime = afiliados
    client.post("/afiliados", json=FULL)
    duplicate = client.post("/afiliados", json={**FULL, "user_id": "u2", "email": "b@example.com"}).json()["id"]
    _validate(runtime)
    with runtime.db.transaction() as session:  # as if advertiser adv-1 had onboarded it
        session.execute(update(tables.afiliados).where(tables.afiliados.c.id == duplicate)
                        .values(registrado_por_anunciante="adv-1"))
    with runtime.db.transaction() as session, pytest.raises(Conflict, match="operator"):
        handlers.approve_afiliado(session, duplicate, Principal("k1", "advertiser", anunciante_id="adv-1"))
    assert client.get(f"/afiliados/{duplicate}").json()["estado"] == "rechazado"
    approved = client.post(f"/afiliados/{duplicate}/aprobar")  # no roles yet: the local operator
    assert approved.status_code == 200 and approved.json()["estado"] == "validado"
