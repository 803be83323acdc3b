"""The live event stream: `/eventos` and its server-sent events `/eventos/stream`.

The source is the audit log (auditoria `GET /auditoria/eventos`), polled with the user's own key:
every event of every business topic is audited, in chain order (`seq`), and an advertiser's key
reads only the records of its own aggregates there, so the stream shows each user what auditoria
would. The console never reads the broker. Filters: topic (applied here: auditoria does not filter
by topic), event type and correlation id (passed to auditoria).

Each server-sent event is `id: <seq>`, `event: evento`, `data: <JSON of the record's summary>`
(static/consola.js shows it); the browser's EventSource sends the last id back when it
reconnects, so nothing is skipped or repeated. A stream lasts at most STREAM_SECONDS (then the
browser reconnects through the guard again). A key refused mid-stream (revoked) signs the session
out and ends the stream with `event: fin`; the browser's reconnection then meets the sign-in page
instead of a stream, and stops.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import quote, urlencode
from datetime import datetime, timedelta, timezone

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from ..contract import EVENT_TOPICS, TOPICS
from ..kernel.access import OPERATOR
from .services import ServiceError, Services
from .web import PageError, render, services_of, session_of

POLL_SECONDS = 1.0
STREAM_SECONDS = 300.0
HEARTBEAT_SECONDS = 15.0
# The page starts with the latest records: an operator's among the last TAIL of the log (records are
# numbered 1, 2, 3 ... and the operator sees them all, so the count is the newest number); anyone
# else's among those of events of the last few minutes. Older ones are in the audit log.
RECENT = timedelta(minutes=10)
TAIL = 300
SHOWN = 50
BATCH = 500
# Empty allowed: the filter form sends `correlation_id=` when its box is left empty (no filter).
_IDENTIFIER = r"^[A-Za-z0-9._:-]*$"


def summary(record: dict) -> dict:
    """What the stream shows of an audit record (the payload stays in auditoria), and where to look
    closer: a conversion's page, or every event of the same correlation."""
    shown = {k: record.get(k) for k in ("seq", "topic", "event_type", "aggregate_id", "correlation_id",
                                        "occurred_at", "actor_role", "schema_version")}
    if record.get("topic") == "conversiones.eventos" and str(record.get("event_type", "")).startswith("Conversion"):
        shown["href"] = f"/anunciante/conversiones/{quote(str(record['aggregate_id']), safe='')}"
    elif record.get("correlation_id"):
        shown["href"] = f"/eventos?{urlencode({'correlation_id': record['correlation_id']})}"
    return shown


class Filters:
    def __init__(self, topic: str | None, event_type: str | None, correlation_id: str | None) -> None:
        self.topic = topic or None
        self.event_type = event_type or None
        self.correlation_id = correlation_id or None

    def params(self) -> dict:
        return {"event_type": self.event_type, "correlation_id": self.correlation_id}

    def keep(self, record: dict) -> bool:
        return self.topic is None or record.get("topic") == self.topic

    def query(self) -> str:
        return urlencode({k: v for k, v in (("topic", self.topic), ("event_type", self.event_type),
                                             ("correlation_id", self.correlation_id)) if v})


async def fetch_after(services: Services, filters: Filters, after_seq: int,
                      since: str | None) -> tuple[list[dict], int]:
    """Records after `after_seq` that pass the filters, and the highest seq read (filtered out or not)."""
    kept: list[dict] = []
    last = after_seq
    while True:
        answer = await services.get("auditoria", "/auditoria/eventos",
                                    {**filters.params(), "after_seq": last, "limit": BATCH,
                                     "desde": since if last == 0 else None})
        records = answer["eventos"]
        kept.extend(r for r in records if filters.keep(r))
        if records:
            last = records[-1]["seq"]
        if len(records) < BATCH:
            return kept, last


async def latest(services: Services, filters: Filters, operator: bool) -> tuple[list[dict], int]:
    """The latest records that pass the filters, and the cursor the stream continues from."""
    if not operator:
        return await fetch_after(services, filters, 0, _since())
    head = (await services.get("auditoria", "/auditoria/eventos", {"limit": 1}))["total"]
    # A correlation's story is short and wanted whole; anything else, from the tail of the log.
    start = 0 if filters.correlation_id else max(0, head - TAIL)
    records, last = await fetch_after(services, filters, start, None)
    return records, max(head, last)


def _since() -> str:
    return (datetime.now(timezone.utc) - RECENT).isoformat()


def _validate(topic: str | None, event_type: str | None) -> None:
    if topic and topic not in TOPICS:
        raise PageError(422, "Invalid input", f"topic: not a topic of the platform ({', '.join(TOPICS)})")
    if event_type and event_type not in EVENT_TOPICS:
        raise PageError(422, "Invalid input", "event_type: not an event type of the platform")


def router() -> APIRouter:
    router = APIRouter()

    @router.get("/eventos")
    async def live_page(request: Request, topic: str | None = Query(None, max_length=64),
                        event_type: str | None = Query(None, max_length=64),
                        correlation_id: str | None = Query(None, max_length=64, pattern=_IDENTIFIER)) -> Response:
        _validate(topic, event_type)
        filters = Filters(topic, event_type, correlation_id)
        records, last = await latest(services_of(request), filters, session_of(request).role == OPERATOR)
        return render(request, "live.html", {
            "records": [summary(r) for r in reversed(records[-SHOWN:])], "last_seq": last, "filters": filters,
            "topic_options": [(t, t) for t in TOPICS],
            "type_options": [(e, e) for e in sorted(e for e, t in EVENT_TOPICS.items()
                                                    if not filters.topic or t == filters.topic)],
            "stream_url": f"/eventos/stream?{filters.query()}{'&' if filters.query() else ''}after={last}",
            "recent_minutes": int(RECENT.total_seconds() // 60), "tail": TAIL})

    @router.get("/eventos/stream")
    async def live_stream(request: Request, topic: str | None = Query(None, max_length=64),
                          event_type: str | None = Query(None, max_length=64),
                          correlation_id: str | None = Query(None, max_length=64, pattern=_IDENTIFIER),
                          after: int = Query(0, ge=0),
                          last_event_id: str | None = Header(None)) -> StreamingResponse:
        _validate(topic, event_type)
        filters = Filters(topic, event_type, correlation_id)
        services = services_of(request)
        start = int(last_event_id) if last_event_id and last_event_id.isdigit() else after
        since = _since()

        async def events() -> AsyncIterator[str]:
            last = start
            began = heartbeat = time.monotonic()
            yield f"retry: 2000\n: stream from seq {last}\n\n"
            while time.monotonic() - began < STREAM_SECONDS:
                if await request.is_disconnected():
                    return
                try:
                    records, newest = await fetch_after(services, filters, last, since)
                except ServiceError as error:
                    if error.status in (401, 403):
                        if error.status == 401:  # revoked or expired: as on any page, signed out
                            request.app.state.sessions.drop(session_of(request).id)
                        yield f"event: fin\ndata: {json.dumps({'reason': error.detail})}\n\n"
                        return
                    # A service down for a moment: say so, keep the cursor, try again.
                    yield f": {error.service} unavailable ({error.status}), retrying\n\n"
                    records, newest = [], last
                for record in records:
                    yield f"id: {record['seq']}\nevent: evento\ndata: {json.dumps(summary(record))}\n\n"
                if newest > last:
                    # Records read but filtered out still move the cursor (and the browser's last id).
                    if not records or records[-1]["seq"] != newest:
                        yield f"id: {newest}\n: cursor\n\n"
                    last = newest
                if time.monotonic() - heartbeat > HEARTBEAT_SECONDS:
                    heartbeat = time.monotonic()
                    yield ": heartbeat\n\n"
                await asyncio.sleep(POLL_SECONDS)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    return router
