"""A tracking-link click survives a kill -9 of conversiones taken right after its redirect: the click
row and its ClickRecorded (outbox) commit, fsynced, before the 302 is sent, so a postback naming the
click id is still attributed, and the click still reaches the audit log (issue 11)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from harness import Platform, wait_until

# A fault test (a SIGKILL and a restart per database): in `make test-slow`, which CI runs.
pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def platform(request, tmp_path):
    running = Platform(tmp_path / "alpes", {"ALPES_AUTH": "required"}, databases=request.param)
    try:
        running.start()
        running.authenticate(running.create_key("operator", "--name", "click crash"))
        yield running
    finally:
        running.close()


def test_a_click_redirected_just_before_a_kill_9_still_attributes_its_conversion(platform: Platform):
    diag = platform.diagnostics
    brand = platform.post("marketing", "/anunciantes", {"nombre": "Shop", "dominios": ["shop.example.com"]})
    assert brand.status_code == 201, brand.text
    campaign = platform.post("marketing", "/campanas", {
        "nombre": "Crash", "porcentaje_comision": "10", "anunciante_id": brand.json()["id"],
        "landing_url": "https://shop.example.com/oferta"})
    assert campaign.status_code == 201, campaign.text
    campana = campaign.json()["id"]
    registered = platform.post("afiliados", "/afiliados", {"user_id": "crash", "email": "crash@example.com",
                                                          "nombre": "Crash Partner"})
    assert registered.status_code == 201, registered.text
    afiliado = registered.json()["id"]
    wait_until(lambda: platform.get("afiliados", f"/afiliados/{afiliado}")["estado"] == "validado",
               what="affiliate validated", diagnose=diag)
    link = wait_until(lambda: (r := platform.post("marketing", f"/campanas/{campana}/inscripciones",
                                                  {"afiliado_id": afiliado})).status_code in (200, 201)
                      and r.json()["link_code"], what="enrolled", diagnose=diag)
    clicks = platform.url("conversiones") + f"/r/{link}"
    wait_until(lambda: platform.http.get(clicks, follow_redirects=False).status_code == 302,
               what="the link redirects", diagnose=diag)

    redirect = platform.http.get(clicks, headers={"User-Agent": "crash-test"}, follow_redirects=False)
    assert redirect.status_code == 302, redirect.text
    old_pid = platform.kill("conversiones")  # SIGKILL the moment the shopper has the redirect
    [click_id] = parse_qs(urlsplit(redirect.headers["location"]).query)["alpes_click_id"]
    platform.wait_restarted("conversiones", old_pid)

    # The shop posts the conversion with the click id alone: attributed through the stored click.
    answer = platform.post("conversiones", "/conversiones", {
        "click_id": click_id, "user_id": "shopper", "conversion_value": "80.00", "conversion_type": "sale",
        "order_id": "crash-1"})
    assert answer.status_code == 200, answer.text
    conversion = platform.get("conversiones", f"/conversiones/{answer.json()['id']}")
    assert (conversion["affiliate_id"], conversion["campaign_id"]) == (afiliado, campana)
    # And the click's own event was not lost with the process: it reaches the audit log.
    wait_until(lambda: any(e["event_type"] == "ClickRecorded" for e in
                           platform.get("auditoria", "/auditoria/eventos", aggregate_id=click_id)["eventos"]),
               what="the click's ClickRecorded in the audit log", diagnose=diag)
