"""Tracking links and clicks: record a click and redirect, and attribute a postback's click to the
affiliate that earns the conversion."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from alpes.kernel.access import Principal
from alpes.kernel.db import Database, bulk_insert
from alpes.kernel.errors import NotFound, RuleViolated
from alpes.kernel.messages import OutgoingEvent
from alpes.kernel.outbox import Outbox
from alpes.kernel.proxies import IPAddress

from . import domain, tables
from .records import TOPIC

log = structlog.get_logger()


# Built once (values bound at execution): the redirect is the hottest path, and SQLAlchemy would
# otherwise build each statement and its cache key again on every click.
_i, _c = tables.ref_inscripciones, tables.ref_campanas
_LINK = select(_i.c.afiliado_id, _i.c.campana_id, _i.c.activa, _c.c.estado, _c.c.landing_url) \
    .join(_c, _c.c.campana_id == _i.c.campana_id, isouter=True).where(_i.c.link_code == bindparam("link_code"))
_LINK_IDS = select(_i.c.afiliado_id, _i.c.campana_id).where(_i.c.link_code == bindparam("link_code"))
_STORED_CLICKS = select(tables.clicks.c.id).where(tables.clicks.c.id.in_(bindparam("ids", expanding=True)))

# How long the redirect trusts what it read of a link: a link suspended, or a campaign paused, stops
# redirecting within this time on every instance (each keeps its own copy).
LINK_TTL_S = 1.0
LINKS_KEPT = 10_000  # distinct links kept at most (then forgotten all at once): memory stays bounded
# The redirect answers before its click's row is written: rows wait in memory this long at most,
# then go to the database in one transaction with their ClicksRecorded events. A kill -9 loses the
# rows (reporting) of the last interval, never an attribution (the click id is a signed token).
CLICK_FLUSH_INTERVAL_S = 0.05
CLICKS_PER_FLUSH = 2_000  # one transaction writes at most this many; more waiting: flushed at once
CLICKS_PER_EVENT = 500  # a ClicksRecorded carries at most this many clicks of one link
# Clicks kept while the database refuses them (then the rows of newer clicks are dropped, counted
# and logged; their click ids still attribute): ~100 s at 1,000 clicks/s.
MAX_PENDING_CLICKS = 100_000


@dataclass(frozen=True)
class Link:
    afiliado_id: str
    campana_id: str
    landing_url: str
    # Where its clicks are redirected, cut where the click id goes (domain.landing_template).
    location: tuple[str, str] = ("", "")

    def location_of(self, click_id: str) -> str:
        return self.location[0] + click_id + self.location[1]


def link_to_follow(session: Session, link_code: str) -> Link:
    """The link a visitor follows. Unknown or inactive links are NotFound."""
    link = session.execute(_LINK, {"link_code": link_code}).first()
    if link is None:
        raise NotFound("link_code", "no tracking link with this code")
    if not link.activa:
        raise NotFound("link_code", "this tracking link is suspended")
    if link.estado != "activa":
        raise NotFound("link_code", "the link's campaign is not active")
    if not link.landing_url:
        raise NotFound("link_code", "campaign has no landing URL")
    return Link(link.afiliado_id, link.campana_id, link.landing_url, domain.landing_template(link.landing_url))


class Links:
    """What the redirect knows of each link, read at most once per LINK_TTL_S per link (a followable
    link only: an unknown or inactive one is read again on every visit)."""

    def __init__(self, read: Callable[[str], Link], ttl: float = LINK_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read, self._ttl, self._clock = read, ttl, clock
        self._kept: dict[str, tuple[float, Link]] = {}

    def cached(self, link_code: str) -> Link | None:
        kept = self._kept.get(link_code)
        if kept is None or kept[0] <= self._clock():
            return None
        return kept[1]

    def get(self, link_code: str) -> Link:
        link = self.cached(link_code)
        if link is None:
            link = self._read(link_code)  # NotFound passes through, and is not kept
            if len(self._kept) >= LINKS_KEPT:
                self._kept.clear()
            self._kept[link_code] = (self._clock() + self._ttl, link)
        return link


@dataclass(frozen=True)
class Click:
    """A click as the redirect saw it: its row in `clicks`, and what its event says of the visitor."""

    row: dict
    visitor_hash: str | None
    actor: Principal | None


def new_click(click_ids: domain.ClickIds, link_code: str, link: Link, *, ip: IPAddress | None,
              user_agent: str | None, referrer: str | None, now: datetime, visitor_id: str | None = None,
              visitor_hash: str | None = None, actor: Principal | None = None) -> tuple[Click, str]:
    """A visit to a followable link: the click (its id a signed token naming the link and the time)
    and where to redirect (the campaign's landing URL with the click id, quoted for the Location
    header). `ip` is a parsed address
    (never header text). `visitor_id` (from the visitor's signed cookie) ties the visitor's clicks
    together for attribution and stays in the clicks table; the event carries only `visitor_hash`
    (VisitorCookies.visitor_hash), never the id."""
    click_id, clicked_at = click_ids.new(link_code, now)
    row = {"id": click_id, "link_code": link_code, "affiliate_id": link.afiliado_id, "campaign_id": link.campana_id,
           "clicked_at": clicked_at, "ip": None if ip is None else str(ip),
           "user_agent": user_agent[:500] if user_agent else None,
           "referrer": referrer[:2000] if referrer else None, "visitor_id": visitor_id}
    return Click(row, visitor_hash, actor), link.location_of(click_id)


def store_clicks(session: Session, clicks: Sequence[Click], *,
                 some_stored: bool = True) -> list[tuple[Principal | None, OutgoingEvent]]:
    """Write the clicks not stored yet and their events: ClicksRecorded per link and actor, at most
    CLICKS_PER_EVENT clicks each. `some_stored`: some may be (a write repeated after an unknown
    outcome): they are looked up and skipped; False skips the lookup. The IP stays in the clicks
    table (personal data): the events carry what analytics needs."""
    fresh = list(clicks)
    if some_stored and fresh:
        stored = set(session.scalars(_STORED_CLICKS, {"ids": [c.row["id"] for c in fresh]}))
        fresh = [c for c in fresh if c.row["id"] not in stored]
    if not fresh:
        return []
    bulk_insert(session, tables.clicks, [c.row for c in fresh])
    groups: dict[tuple, list[Click]] = {}
    for click in fresh:
        actor = click.actor
        groups.setdefault((click.row["link_code"], actor and actor.id, actor and actor.role), []).append(click)
    events = []
    for group in groups.values():
        for start in range(0, len(group), CLICKS_PER_EVENT):
            part = group[start:start + CLICKS_PER_EVENT]
            first = part[0].row
            events.append((part[0].actor, OutgoingEvent(TOPIC, "ClicksRecorded", first["campaign_id"], {
                "link_code": first["link_code"], "affiliate_id": first["affiliate_id"],
                "campaign_id": first["campaign_id"], "timestamp": first["clicked_at"],
                "clicks": [{"click_id": c.row["id"], "timestamp": c.row["clicked_at"],
                            "user_agent": c.row["user_agent"], "referrer": c.row["referrer"],
                            "visitor_hash": c.visitor_hash} for c in part]})))
    return events


class ClickRecorder:
    """Records clicks for the redirect. While the service runs (`buffering()`), a click waits in
    memory and `flush` (a job, every CLICK_FLUSH_INTERVAL_S) writes the waiting ones in one
    transaction: the redirect costs no write and no fsync. Otherwise (the service not started, or
    stopping) each click is written before the redirect answers."""

    def __init__(self, db: Database, outbox: Outbox, click_ids: domain.ClickIds,
                 buffering: Callable[[], bool], wake_relay: Callable[[], None] = lambda: None,
                 on_dropped: Callable[[int], None] = lambda n: None) -> None:
        self.db, self.outbox, self.click_ids = db, outbox, click_ids
        self.buffering, self.wake_relay, self.on_dropped = buffering, wake_relay, on_dropped
        self.links = Links(self._read_link)
        self._pending: list[Click] = []
        self._oldest = 0.0  # monotonic time the oldest waiting click arrived
        self._lock = threading.Lock()
        self._closed = False
        self._failed = False  # the last write failed (its outcome unknown)
        self.dropped = 0

    def _read_link(self, link_code: str) -> Link:
        with self.db.read() as session:
            return link_to_follow(session, link_code)

    def follow_in_memory(self, link_code: str, **visit) -> str | None:
        """`follow`, when it needs no I/O (the link read lately, the click kept in memory); None
        when it would (then call `follow`)."""
        link = self.links.cached(link_code)
        if link is None or not self.buffering():
            return None
        return self._follow(link_code, link, visit)

    def follow(self, link_code: str, **visit) -> str:
        """Record a visit to `link_code`; where to redirect. NotFound for a link not to follow."""
        return self._follow(link_code, self.links.get(link_code), visit)

    def _follow(self, link_code: str, link: Link, visit: dict) -> str:
        click, location = new_click(self.click_ids, link_code, link, **visit)
        with self._lock:
            buffering = self.buffering() and not self._closed
            if buffering and len(self._pending) < MAX_PENDING_CLICKS:
                if not self._pending:
                    self._oldest = time.monotonic()
                self._pending.append(click)
                return location
            if buffering:
                self.dropped += 1
                dropped = self.dropped
        if not buffering:
            self._write([click])
            return location
        # The visitor is still redirected and its click id still attributes: only the row is lost.
        self.on_dropped(1)
        if dropped == 1 or dropped % 1000 == 0:
            log.warning("click rows dropped: the database has refused clicks for a while",
                        pending=MAX_PENDING_CLICKS, dropped=dropped)
        return location

    def flush(self, *, force: bool = False) -> int:
        """Write the clicks waiting for at least CLICK_FLUSH_INTERVAL_S (or all, `force`), at most
        CLICKS_PER_FLUSH; returns how many wait still (more: call again at once). A failure keeps
        them, in order, for the next flush."""
        with self._lock:
            if not self._pending or not (force or len(self._pending) >= CLICKS_PER_FLUSH
                                         or time.monotonic() - self._oldest >= CLICK_FLUSH_INTERVAL_S):
                return 0
            batch, self._pending = self._pending[:CLICKS_PER_FLUSH], self._pending[CLICKS_PER_FLUSH:]
            if self._pending:
                self._oldest = time.monotonic()
        try:
            self._write(batch, some_stored=self._failed)
        except Exception:
            with self._lock:
                self._pending[:0] = batch
                self._oldest = time.monotonic() - CLICK_FLUSH_INTERVAL_S
                # Its commit may have happened all the same: the next write looks its clicks up.
                self._failed = True
            raise
        self._failed = False
        with self._lock:
            return len(self._pending) if len(self._pending) >= CLICKS_PER_FLUSH else 0

    def write_waiting(self) -> None:
        """Before a postback naming a click is attributed: the clicks this process holds go to the
        database now, so the click and the visitor's other clicks compete as stored ones (a shop
        may post within the flush interval). Another instance's waiting clicks are not seen: the
        click named is then judged from its signed id alone."""
        while self.pending():
            self.flush(force=True)

    def close(self) -> None:
        """The service stops: from now on clicks are written as they come; the waiting ones now."""
        with self._lock:
            self._closed = True
        self.write_waiting()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _write(self, clicks: list[Click], some_stored: bool = False) -> None:
        with self.db.transaction() as session:
            for actor, event in store_clicks(session, clicks, some_stored=some_stored):
                self.outbox.add(session, [event], actor)
        self.wake_relay()


@dataclass(frozen=True)
class Attribution:
    affiliate_id: str
    campaign_id: str
    click_id: str  # the click that earns the conversion (may differ from the one the postback named)


def attribution_of(session: Session, click_ids: domain.ClickIds | None, click_id: str, affiliate_id: str | None,
                   campaign_id: str | None, converted_at: datetime) -> Attribution:
    """Whom a postback's click_id attributes it to. Ids given beside it must agree with that click.
    A click whose row is not (yet, or any more after a crash) stored is known from its signed id
    alone. When the click carries a visitor id, the visitor's clicks on the same campaign within its
    window before the conversion compete under the campaign's model (last click by default, or first
    click); the winner's affiliate earns the conversion."""
    k = tables.clicks
    click = session.execute(select(k.c.id, k.c.affiliate_id, k.c.campaign_id, k.c.clicked_at, k.c.visitor_id)
                            .where(k.c.id == click_id)).first()
    if click is None:
        click = _unstored_click(session, click_ids, click_id)
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


@dataclass(frozen=True)
class _UnstoredClick:
    id: str
    affiliate_id: str
    campaign_id: str
    clicked_at: datetime
    visitor_id: None = None  # the visitor is in the row only: the click competes with no other


def _unstored_click(session: Session, click_ids: domain.ClickIds | None, click_id: str) -> _UnstoredClick:
    signed = None if click_ids is None else click_ids.verified(click_id)
    if signed is None:
        raise RuleViolated("click_id", "no click with this id")
    link = session.execute(_LINK_IDS, {"link_code": signed.link_code}).first()
    if link is None:
        raise RuleViolated("click_id", "no click with this id")
    return _UnstoredClick(click_id, link.afiliado_id, link.campana_id, signed.clicked_at)


def campaign_of_click(session: Session, click_id: str) -> str | None:
    """The campaign a click id names, from its row or, not stored, from the link its id names (not
    checked here: attribution checks the id's signature)."""
    campaign_id = session.scalar(select(tables.clicks.c.campaign_id).where(tables.clicks.c.id == click_id))
    if campaign_id is None and (named := domain.click_of_stored_id(click_id)) is not None:
        link = session.execute(_LINK_IDS, {"link_code": named.link_code}).first()
        campaign_id = None if link is None else link.campana_id
    return campaign_id


def attributed_click_id(session: Session, conversion_id: str) -> str | None:
    """The click a conversion was attributed through (None: attributed by ids)."""
    a = tables.click_attributions
    return session.scalar(select(a.c.click_id).where(a.c.conversion_id == conversion_id))
