"""Tracking links and clicks: record a click and redirect, and attribute a postback's click to the
affiliate that earns the conversion."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from alpes.kernel.errors import NotFound, RuleViolated
from alpes.kernel.messages import OutgoingEvent, new_id, utcnow
from alpes.kernel.proxies import IPAddress

from . import domain, tables
from .records import TOPIC


# Built once (values bound at execution): the redirect is the hottest path, and SQLAlchemy would
# otherwise build each statement and its cache key again on every click.
_i, _c = tables.ref_inscripciones, tables.ref_campanas
_LINK = select(_i.c.afiliado_id, _i.c.campana_id, _i.c.activa, _c.c.estado, _c.c.landing_url) \
    .join(_c, _c.c.campana_id == _i.c.campana_id, isouter=True).where(_i.c.link_code == bindparam("link_code"))
_INSERT_CLICK = tables.clicks.insert()


def record_click(session: Session, link_code: str, *, ip: IPAddress | None, user_agent: str | None,
                 referrer: str | None, now: datetime | None = None, visitor_id: str | None = None,
                 visitor_hash: str | None = None) -> tuple[str, str, list[OutgoingEvent]]:
    """A visit to a tracking link: store the click, answer where to redirect (the campaign's
    landing URL with the click id) and ClickRecorded. Unknown or inactive links are NotFound and store nothing.
    `ip` is a parsed address (never header text). `visitor_id` (from the visitor's signed cookie)
    ties the visitor's clicks together for attribution and stays in the clicks table; the event
    carries only `visitor_hash` (VisitorCookies.visitor_hash), never the id."""
    link = session.execute(_LINK, {"link_code": link_code}).first()
    if link is None:
        raise NotFound("link_code", "no tracking link with this code")
    if not link.activa:
        raise NotFound("link_code", "this tracking link is suspended")
    if link.estado != "activa":
        raise NotFound("link_code", "the link's campaign is not active")
    if not link.landing_url:
        raise NotFound("link_code", "campaign has no landing URL")
    click_id, clicked_at = new_id(), now or utcnow()
    user_agent = user_agent[:500] if user_agent else None
    referrer = referrer[:2000] if referrer else None
    session.execute(_INSERT_CLICK, {
        "id": click_id, "link_code": link_code, "affiliate_id": link.afiliado_id, "campaign_id": link.campana_id,
        "clicked_at": clicked_at, "ip": None if ip is None else str(ipaddress.ip_address(ip)),
        "user_agent": user_agent, "referrer": referrer, "visitor_id": visitor_id})
    # The IP stays in the clicks table (personal data): the event carries what analytics needs.
    event = OutgoingEvent(TOPIC, "ClickRecorded", click_id, {
        "click_id": click_id, "link_code": link_code, "affiliate_id": link.afiliado_id,
        "campaign_id": link.campana_id, "timestamp": clicked_at, "user_agent": user_agent, "referrer": referrer,
        "visitor_hash": visitor_hash})
    return click_id, domain.landing_with_click_id(link.landing_url, click_id), [event]


@dataclass(frozen=True)
class Attribution:
    affiliate_id: str
    campaign_id: str
    click_id: str  # the click that earns the conversion (may differ from the one the postback named)


def attribution_of(session: Session, click_id: str, affiliate_id: str | None, campaign_id: str | None,
                   converted_at: datetime) -> Attribution:
    """Whom a postback's click_id attributes it to. Ids given beside it must agree with that click.
    When the click carries a visitor id, the visitor's clicks on the same campaign within its window
    before the conversion compete under the campaign's model (last click by default, or first click);
    the winner's affiliate earns the conversion."""
    k = tables.clicks
    click = session.execute(select(k.c.id, k.c.affiliate_id, k.c.campaign_id, k.c.clicked_at, k.c.visitor_id)
                            .where(k.c.id == click_id)).first()
    if click is None:
        raise RuleViolated("click_id", "no click with this id")
    for field, given, clicked in (("affiliate_id", affiliate_id, click.affiliate_id),
                                  ("campaign_id", campaign_id, click.campaign_id)):
        if given is not None and given != clicked:
            raise RuleViolated(field, f"differs from the {field} of the click")
    if click.visitor_id is None:
        return Attribution(click.affiliate_id, click.campaign_id, click.id)  # nothing ties it to other clicks
    rc = tables.ref_campanas
    campana = session.execute(select(rc.c.modelo_atribucion, rc.c.ventana_atribucion_dias)
                              .where(rc.c.campana_id == click.campaign_id)).first()
    if campana is None:  # the campaign is not known yet (the click is): its own click, judged at validation
        return Attribution(click.affiliate_id, click.campaign_id, click.id)
    window = timedelta(days=campana.ventana_atribucion_dias)
    rows = session.execute(select(k.c.id, k.c.affiliate_id, k.c.clicked_at).where(
        k.c.campaign_id == click.campaign_id, k.c.visitor_id == click.visitor_id,
        k.c.clicked_at >= converted_at - window, k.c.clicked_at <= converted_at)).all()
    chosen = domain.attributed_click(domain.Click(click.id, click.clicked_at),
                                     [domain.Click(r.id, r.clicked_at) for r in rows],
                                     campana.modelo_atribucion, converted_at, window)
    affiliate = {r.id: r.affiliate_id for r in rows}.get(chosen.click_id, click.affiliate_id)
    return Attribution(affiliate, click.campaign_id, chosen.click_id)


def attributed_click_id(session: Session, conversion_id: str) -> str | None:
    """The click a conversion was attributed through (None: attributed by ids)."""
    a = tables.click_attributions
    return session.scalar(select(a.c.click_id).where(a.c.conversion_id == conversion_id))
