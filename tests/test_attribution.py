"""Attribution models per campaign (last click by default, or first click) across a visitor's clicks,
the visitor cookie, ConversionValidated v2 (click and conversion time) and what marketing does with it:
rule version, tier month and caps by conversion time, the click in the commission's explanation, and
tiers that count approved (not reversed) conversions."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import import_module
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_campaign_lifecycle import _incoming
from test_commission_lifecycle import Marketing
from test_http import _fields

from alpes.conversiones import domain as cdomain
from alpes.conversiones import reference as creference
from alpes.conversiones import tracking as ctracking
from alpes.kernel.codec import SchemaRegistry
from alpes.kernel.messages import new_id
from alpes.marketing import commissions
from alpes.settings import Settings

REGISTRY = SchemaRegistry.from_directory()
NOW = datetime(2026, 11, 18, 12, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)
WINDOW = timedelta(days=7)


# -- the rule, in the domain ---------------------------------------------------------------------
def _c(name: str, hours: float) -> cdomain.Click:
    return cdomain.Click(name, NOW + timedelta(hours=hours))


def test_last_click_takes_the_latest_and_first_click_the_earliest_within_the_window_before_the_conversion():
    presented = _c("b", 2)
    clicks = [_c("old", -24 * 8), _c("a", 0), presented, _c("c", 5), _c("after", 30)]
    converted_at = NOW + timedelta(hours=24)
    assert cdomain.attributed_click(presented, clicks, "ultimo_click", converted_at, WINDOW).click_id == "c"
    assert cdomain.attributed_click(presented, clicks, "primer_click", converted_at, WINDOW).click_id == "a"
    # No visitor clicks (no visitor id), or none inside the window: the presented click itself.
    assert cdomain.attributed_click(presented, [], "primer_click", converted_at, WINDOW) is presented
    late = NOW + timedelta(days=30)
    assert cdomain.attributed_click(presented, clicks, "ultimo_click", late, WINDOW) is presented
    # Equal times: the click id breaks the tie, the same way every time.
    twins = [_c("y", 1), _c("x", 1)]
    assert cdomain.attributed_click(twins[0], twins, "primer_click", converted_at, WINDOW).click_id == "x"
    assert cdomain.attributed_click(twins[0], twins, "ultimo_click", converted_at, WINDOW).click_id == "y"
    with pytest.raises(ValueError):
        cdomain.attributed_click(presented, clicks, "lineal", converted_at, WINDOW)


def test_the_visitor_cookie_is_reused_only_when_it_is_ours():
    visitors = cdomain.VisitorCookies([b"k" * 32])
    fresh = visitors.visitor_id_or_new(None)
    assert len(fresh) == 32 and int(fresh, 16) >= 0
    assert visitors.visitor_id_or_new(visitors.cookie_for(fresh)) == fresh  # signed by us
    assert visitors.visitor_id_or_new(fresh) != fresh  # the bare id is no cookie of ours (issue 10)
    assert visitors.visitor_id_or_new(visitors.cookie_for(fresh).upper()) != fresh
    assert visitors.visitor_id_or_new("x' OR 1=1 --") != "x' OR 1=1 --"
    assert visitors.visitor_id_or_new(None) != fresh


# -- conversiones, in-process with an injected clock ---------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def _learn(runtime, events) -> None:
    handlers = {"CampanaCreada": creference.learn_campana, "AfiliadoHabilitado": creference.learn_afiliado,
                "AfiliadoInscrito": creference.learn_inscripcion}
    with runtime.db.transaction() as session:
        for event_type, payload, version in events:
            handlers[event_type](session, _incoming(REGISTRY, event_type, payload, version))


def _campaign(campana_id: str, version: int, **extra) -> tuple[str, dict, int]:
    return ("CampanaCreada", {"id": campana_id, "nombre": campana_id, "porcentaje_comision": Decimal("10"),
                              "moneda": "EUR", "timestamp": NOW, "landing_url": "https://shop.example.com/p",
                              "ventana_atribucion_dias": 7, **extra}, version)


@pytest.fixture
def conv(tmp_path):
    """conversiones knowing a last-click campaign `kl` (announced with CampanaCreada v3, before
    models existed), a first-click campaign `kf` (v4) and another last-click one `ko`; affiliates
    a1 and a2 enrolled in kl and kf, a1 in ko."""
    clock = Clock()
    app, runtime = import_module("alpes.conversiones.service").build(
        Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1"), clock=clock)
    events = [_campaign("kl", 3), _campaign("kf", 4, modelo_atribucion="primer_click"), _campaign("ko", 4)]
    for afiliado in ("a1", "a2"):
        events.append(("AfiliadoHabilitado", {"afiliado_id": afiliado, "timestamp": NOW}, 1))
    for campana, afiliado in (("kl", "a1"), ("kl", "a2"), ("kf", "a1"), ("kf", "a2"), ("ko", "a1")):
        events.append(("AfiliadoInscrito", {"inscripcion_id": f"i-{campana}-{afiliado}", "campana_id": campana,
                                            "afiliado_id": afiliado, "link_code": f"{campana}{afiliado}link",
                                            "timestamp": NOW}, 1))
    _learn(runtime, events)
    return app, runtime, import_module("alpes.conversiones.tables"), clock


def _visit(client: TestClient, clock: Clock, link: str, at: timedelta) -> str:
    clock.now = NOW + at
    response = client.get(f"/r/{link}", follow_redirects=False)
    assert response.status_code == 302, response.text
    [click_id] = parse_qs(urlsplit(response.headers["location"]).query)["alpes_click_id"]
    return click_id


def _convert(client: TestClient, clock: Clock, click_id: str, at: timedelta, **extra) -> dict:
    clock.now = NOW + at
    response = client.post("/conversiones", json={"user_id": "cliente", "conversion_value": "50.00",
                                                  "conversion_type": "sale", "click_id": click_id, **extra})
    assert response.status_code == 200, response.text
    return client.get(f"/conversiones/{response.json()['id']}").json()


def _validated_events(runtime, tables) -> dict[str, dict]:
    with runtime.db.read() as session:
        rows = session.execute(select(tables.outbox).where(tables.outbox.c.event_type == "ConversionValidated")
                               ).mappings().all()
    assert all(r["schema_version"] == 2 for r in rows)
    decoded = [REGISTRY.decode("ConversionValidated", r["payload"], r["schema_version"]) for r in rows]
    return {p["conversion_id"]: p for p in decoded}


def test_the_redirect_sets_a_long_lived_visitor_cookie_and_records_it_on_the_click(conv):
    app, runtime, tables, _ = conv
    client = TestClient(app)
    response = client.get("/r/kla1link", follow_redirects=False)
    cookie = response.headers["set-cookie"]
    visitor = client.cookies["alpes_vid"].split(".")[0]  # `<visitor id>.<HMAC>`
    assert len(visitor) == 32 and "HttpOnly" in cookie and "Path=/r/" in cookie
    assert f"Max-Age={400 * 24 * 3600}" in cookie and "samesite=lax" in cookie.lower()
    client.get("/r/kfa2link", follow_redirects=False)
    assert client.cookies["alpes_vid"].split(".")[0] == visitor  # the incoming cookie is reused (and renewed)
    other = TestClient(app)
    other.cookies.set("alpes_vid", "forged<script>", path="/r/")
    other.get("/r/kla1link", follow_redirects=False)
    with runtime.db.read() as session:
        visitors = session.scalars(select(tables.clicks.c.visitor_id).order_by(tables.clicks.c.clicked_at,
                                                                               tables.clicks.c.id)).all()
        rows = session.execute(select(tables.outbox.c.payload, tables.outbox.c.schema_version)
                               .where(tables.outbox.c.event_type == "ClicksRecorded")).all()
    assert visitors.count(visitor) == 2 and len(set(visitors)) == 2 and "forged<script>" not in visitors
    events = [c for r in rows for c in REGISTRY.decode("ClicksRecorded", r.payload, r.schema_version)["clicks"]]
    # A click's event carries a keyed hash of the visitor, never its id (issue 10): equal per visitor.
    assert len(events) == 3 and all("visitor_id" not in e for e in events)
    hashes = [e["visitor_hash"] for e in events]
    assert len(set(hashes)) == 2 and visitor not in hashes and hashes.count(hashes[0]) == 2


def test_last_click_credits_the_affiliate_of_the_visitors_latest_click(conv):
    app, runtime, tables, clock = conv
    client = TestClient(app)
    first = _visit(client, clock, "kla1link", timedelta(0))
    last = _visit(client, clock, "kla2link", HOUR)
    # The shop kept the first click's id and sends it: the campaign (last click, by default) gives it to a2.
    conversion = _convert(client, clock, first, 2 * HOUR)
    assert (conversion["affiliate_id"], conversion["status"]) == ("a2", "validated")
    validated = _validated_events(runtime, tables)[conversion["id"]]
    assert (validated["affiliate_id"], validated["click_id"], validated["converted_at"]) == ("a2", last, NOW + 2 * HOUR)
    assert validated["timestamp"] == NOW + 2 * HOUR
    with runtime.db.read() as session:
        assert session.scalar(select(tables.click_attributions.c.click_id).where(
            tables.click_attributions.c.conversion_id == conversion["id"])) == last


def test_first_click_credits_the_affiliate_who_brought_the_visitor_first(conv):
    app, runtime, tables, clock = conv
    client = TestClient(app)
    first = _visit(client, clock, "kfa1link", timedelta(0))
    _visit(client, clock, "kla2link", HOUR // 2)  # another campaign: does not compete
    last = _visit(client, clock, "kfa2link", HOUR)
    conversion = _convert(client, clock, last, 2 * HOUR)
    assert (conversion["affiliate_id"], conversion["campaign_id"], conversion["status"]) == ("a1", "kf", "validated")
    assert _validated_events(runtime, tables)[conversion["id"]]["click_id"] == first


def test_only_clicks_within_the_window_before_the_conversion_compete(conv):
    app, runtime, tables, clock = conv
    client = TestClient(app)
    stale = _visit(client, clock, "kfa1link", timedelta(0))  # 8 days before the conversion: outside 7
    inside = _visit(client, clock, "kfa2link", timedelta(days=3))
    conversion = _convert(client, clock, inside, timedelta(days=8))
    assert (conversion["affiliate_id"], conversion["status"]) == ("a2", "validated")
    assert _validated_events(runtime, tables)[conversion["id"]]["click_id"] == inside
    # None of the visitor's clicks inside the window: the presented one is judged, and rejected.
    late = _convert(client, clock, stale, timedelta(days=20), order_id="late")
    assert (late["affiliate_id"], late["status"], late["reason"]) == ("a1", "rejected", "outside_attribution_window")


def test_clicks_of_other_visitors_or_without_a_visitor_id_never_compete(conv):
    app, runtime, tables, clock = conv
    ana, otro = TestClient(app), TestClient(app)
    own = _visit(ana, clock, "kla1link", timedelta(0))
    _visit(otro, clock, "kla2link", HOUR)  # another browser, another cookie
    assert _convert(ana, clock, own, 2 * HOUR)["affiliate_id"] == "a1"
    # A click recorded without a visitor id (before the cookie existed) attributes to itself.
    clock.now = NOW + 3 * HOUR
    with runtime.db.transaction() as session:
        link = ctracking.link_to_follow(session, "kla1link")
        click, _ = ctracking.new_click(cdomain.ClickIds([b"k" * 32]), "kla1link", link, ip=None,
                                       user_agent=None, referrer=None, now=clock.now)
        ctracking.store_clicks(session, [click])
        bare = click.row["id"]
    _visit(ana, clock, "kla2link", 4 * HOUR)
    conversion = _convert(ana, clock, bare, 5 * HOUR, order_id="bare")
    assert conversion["affiliate_id"] == "a1"
    assert _validated_events(runtime, tables)[conversion["id"]]["click_id"] == bare


def test_ids_beside_the_click_id_are_checked_against_the_click_the_shop_sent(conv):
    app, _, _, clock = conv
    client = TestClient(app)
    first = _visit(client, clock, "kla1link", timedelta(0))
    _visit(client, clock, "kla2link", HOUR)
    ok = _convert(client, clock, first, 2 * HOUR, affiliate_id="a1", campaign_id="kl")
    assert ok["affiliate_id"] == "a2"  # a1's click was presented; last click credits a2
    clock.now = NOW + 3 * HOUR
    wrong = client.post("/conversiones", json={"user_id": "c", "conversion_value": "1.00", "conversion_type": "sale",
                                               "click_id": first, "affiliate_id": "a2"})
    assert wrong.status_code == 422 and _fields(wrong) == {"affiliate_id"}


def test_an_id_postback_carries_no_click_and_the_time_it_happened(conv):
    app, runtime, tables, clock = conv
    client = TestClient(app)
    clock.now = NOW + HOUR
    response = client.post("/conversiones", json={"user_id": "c", "conversion_value": "5.00", "conversion_type": "lead",
                                                  "affiliate_id": "a1", "campaign_id": "ko"})
    validated = _validated_events(runtime, tables)[response.json()["id"]]
    assert (validated["click_id"], validated["converted_at"]) == (None, NOW + HOUR)


def test_a_held_conversion_approved_later_carries_its_conversion_time_and_click(tmp_path):
    clock = Clock()
    app, runtime = import_module("alpes.conversiones.service").build(
        Settings(data_dir=tmp_path, broker_url="pulsar://127.0.0.1:1"), clock=clock)
    _learn(runtime, [_campaign("kt", 4, min_segundos_click_conversion=60),
                     ("AfiliadoHabilitado", {"afiliado_id": "a1", "timestamp": NOW}, 1),
                     ("AfiliadoInscrito", {"inscripcion_id": "i1", "campana_id": "kt", "afiliado_id": "a1",
                                           "link_code": "ktfastlink", "timestamp": NOW}, 1)])
    tables = import_module("alpes.conversiones.tables")
    client = TestClient(app)
    click = _visit(client, clock, "ktfastlink", timedelta(0))
    held = _convert(client, clock, click, timedelta(seconds=5))
    assert (held["status"], held["reason"]) == ("on_hold", "too_fast")
    clock.now = NOW + timedelta(days=2)
    assert client.post(f"/conversiones/{held['id']}/aprobar").json()["status"] == "validated"
    validated = _validated_events(runtime, tables)[held["id"]]
    assert (validated["click_id"], validated["converted_at"], validated["timestamp"]) == (
        click, NOW + timedelta(seconds=5), NOW + timedelta(days=2))


# -- schemas ---------------------------------------------------------------------------------------
def test_older_versions_read_with_the_new_fields_defaulted():
    click = {"click_id": "k", "link_code": "l", "affiliate_id": "a", "campaign_id": "c", "timestamp": NOW}
    data, _ = REGISTRY.encode("ClickRecorded", click, 1)
    assert REGISTRY.decode("ClickRecorded", data, 1)["visitor_hash"] is None
    assert REGISTRY.decode("ClickRecorded", data, 1, 2)["visitor_id"] is None
    validated = {"conversion_id": "x", "affiliate_id": "a", "campaign_id": "c", "conversion_value": Decimal("1.00"),
                 "currency": "EUR", "conversion_type": "sale", "timestamp": NOW}
    data, _ = REGISTRY.encode("ConversionValidated", validated, 1)
    read = REGISTRY.decode("ConversionValidated", data, 1)
    assert (read["click_id"], read["converted_at"]) == (None, None)
    campana = {"id": "k", "nombre": "n", "porcentaje_comision": Decimal("10"), "moneda": "EUR", "timestamp": NOW}
    for version in (1, 2, 3):
        data, _ = REGISTRY.encode("CampanaCreada", campana, version)
        read = REGISTRY.decode("CampanaCreada", data, version)
        assert read["modelo_atribucion"] == "ultimo_click"
        # v5's terms read as operator-owned, no maximum (conversiones' reference data takes them so).
        assert (read["anunciante_id"], read["valor_maximo_conversion"]) == (None, None)
    assert REGISTRY.latest_version("CampanaCreada") == 5 and REGISTRY.latest_version("ConversionValidated") == 2


# -- marketing ----------------------------------------------------------------------------------------
@pytest.fixture
def mk(tmp_path):
    return Marketing(tmp_path)


def test_campaigns_take_an_attribution_model_show_it_and_announce_it(mk):
    default = mk.client.post("/campanas", json={"nombre": "Uno", "porcentaje_comision": "5"}).json()
    first = mk.client.post("/campanas", json={"nombre": "Dos", "porcentaje_comision": "5",
                                              "modelo_atribucion": "primer_click"}).json()
    assert (default["modelo_atribucion"], first["modelo_atribucion"]) == ("ultimo_click", "primer_click")
    listed = {c["id"]: c["modelo_atribucion"] for c in mk.client.get("/campanas").json()["campanas"]}
    assert listed == {default["id"]: "ultimo_click", first["id"]: "primer_click"}
    bad = mk.client.post("/campanas", json={"nombre": "Tres", "porcentaje_comision": "5", "modelo_atribucion": "lineal"})
    assert bad.status_code == 422 and _fields(bad) == {"modelo_atribucion"}
    with mk.runtime.db.read() as session:
        rows = session.execute(select(mk.tables.outbox).where(mk.tables.outbox.c.event_type == "CampanaCreada")
                               .order_by(mk.tables.outbox.c.id)).mappings().all()
    assert [r["schema_version"] for r in rows] == [REGISTRY.latest_version("CampanaCreada")] * 2
    assert [REGISTRY.decode("CampanaCreada", r["payload"], r["schema_version"])["modelo_atribucion"] for r in rows] == [
        "ultimo_click", "primer_click"]


def _validated_v(mk: Marketing, version: int, campana: str, afiliado: str = "ana", valor: str = "100.00",
                 validated_at: datetime | None = None, **v2) -> dict:
    payload = {"conversion_id": new_id(), "affiliate_id": afiliado, "campaign_id": campana,
               "conversion_value": Decimal(valor), "currency": "EUR", "conversion_type": "sale",
               "timestamp": validated_at or datetime.now(timezone.utc), **v2}
    event = _incoming(REGISTRY, "ConversionValidated", payload, version)  # encoded and read as the consumer does
    with mk.runtime.db.transaction() as session:
        mk.emitted += commissions.calculate_comision(session, event)
    return mk.comision(payload["conversion_id"])


def test_the_rule_version_is_chosen_by_conversion_time_and_the_click_is_explained(mk):
    campana = mk.campana(porcentaje="10")
    before_rules = datetime.now(timezone.utc)
    assert mk.client.put(f"/campanas/{campana}/reglas", json={"reglas": [{"tipo": "cpa", "monto": "7.00"}]}
                         ).status_code == 200
    after_rules = datetime.now(timezone.utc)
    # Converted before the rules, validated (say after a review) after them: version 0, the campaign's 10 %.
    held = _validated_v(mk, 2, campana, validated_at=after_rules, converted_at=before_rules, click_id="click-1")
    explain = mk.client.get(f"/comisiones/{held['id']}/explain").json()
    assert (held["monto"], explain["version_reglas"], explain["click_id"]) == ("10.00", 0, "click-1")
    assert explain["inputs"]["momento_conversion"] == before_rules.isoformat()
    # A v1 event has only its validation time: that decides, so version 1 (the flat 7.00).
    old = _validated_v(mk, 1, campana, validated_at=after_rules)
    explain = mk.client.get(f"/comisiones/{old['id']}/explain").json()
    assert (old["monto"], explain["version_reglas"], explain["click_id"]) == ("7.00", 1, None)
    assert explain["inputs"]["momento_conversion"] == after_rules.isoformat()


def test_cap_periods_and_the_tier_month_follow_the_conversion_time(mk):
    campana = mk.campana(porcentaje="10")
    mk.client.put(f"/campanas/{campana}/reglas", json={"reglas": [{"tipo": "cps", "porcentaje": "10"}],
                                                       "tope_por_afiliado": {"monto": "15.00", "periodo": "dia"}})
    today = datetime.now(timezone.utc)
    yesterday = today - timedelta(days=1)
    # Validated today, converted yesterday: yesterday's cap (15.00) takes it in full...
    assert _validated_v(mk, 2, campana, converted_at=yesterday)["monto"] == "10.00"
    # ...and today's cap is untouched by it.
    assert _validated_v(mk, 2, campana, converted_at=today)["monto"] == "10.00"
    assert _validated_v(mk, 2, campana, converted_at=today)["monto"] == "5.00"  # today's cap now cuts


def test_the_tier_counts_the_months_approved_conversions_that_were_not_reversed(mk):
    campana = mk.campana(porcentaje="10")
    mk.client.put(f"/campanas/{campana}/reglas", json={
        "reglas": [{"tipo": "cps", "porcentaje": "20", "min_aprobadas": 2}, {"tipo": "cps", "porcentaje": "10"}],
        "tope_por_afiliado": {"monto": "30.00", "periodo": "total"}})
    now = datetime.now(timezone.utc)

    def convert(afiliado="ana", converted_at=now) -> dict:
        comision = _validated_v(mk, 2, campana, afiliado=afiliado, converted_at=converted_at)
        return comision | {"explain": mk.client.get(f"/comisiones/{comision['id']}/explain").json()}

    c1, c2 = convert(), convert()
    assert [c["monto"] for c in (c1, c2)] == ["10.00", "10.00"]
    mk.refunded(c1["conversion_id"])  # refunded: no longer an approved conversion
    c3 = convert()
    assert (c3["monto"], c3["explain"]["inputs"]["aprobadas_en_el_mes"]) == ("10.00", 1)  # c2 only
    c4 = convert()  # c2, c3: the tier
    assert (c4["monto"], c4["explain"]["regla_id"], c4["explain"]["inputs"]["aprobadas_en_el_mes"]) == ("0.00", "r1", 2)
    assert c4["explain"]["limitado_por"] == "tope_afiliado"  # 30.00 total cap spent (c1's reversal gives none back)
    # Cut to zero, c4 still counts: its conversion was approved. Another month's conversion does not.
    last_month = now.replace(day=1) - timedelta(days=1)
    other_month = convert(converted_at=last_month)
    assert other_month["explain"]["inputs"]["aprobadas_en_el_mes"] == 0
    assert convert()["explain"]["inputs"]["aprobadas_en_el_mes"] == 3  # c2, c3, c4
    assert convert(afiliado="beto")["explain"]["inputs"]["aprobadas_en_el_mes"] == 0  # per affiliate


def test_the_clock_offset_setting_runs_conversiones_ahead(tmp_path):
    """ALPES_CONVERSIONES_CLOCK_OFFSET_SECONDS (a test/demo knob) shifts the time clicks and
    conversions are stamped with; unset, the real clock."""
    ahead = timedelta(days=2)
    for offset, data_dir in ((ahead, tmp_path / "ahead"), (timedelta(0), tmp_path / "now")):
        settings = Settings(data_dir=data_dir, broker_url="pulsar://127.0.0.1:1",
                            conversiones_clock_offset_seconds=offset.total_seconds())
        app, runtime = import_module("alpes.conversiones.service").build(settings)
        _learn(runtime, [_campaign("kc", 4), ("AfiliadoHabilitado", {"afiliado_id": "a1", "timestamp": NOW}, 1),
                         ("AfiliadoInscrito", {"inscripcion_id": "i1", "campana_id": "kc", "afiliado_id": "a1",
                                               "link_code": "kcclocklnk", "timestamp": NOW}, 1)])
        before = datetime.now(timezone.utc)
        assert TestClient(app).get("/r/kcclocklnk", follow_redirects=False).status_code == 302
        after = datetime.now(timezone.utc)
        tables = import_module("alpes.conversiones.tables")
        with runtime.db.read() as session:
            clicked_at = session.scalar(select(tables.clicks.c.clicked_at))
        assert before + offset <= clicked_at <= after + offset
