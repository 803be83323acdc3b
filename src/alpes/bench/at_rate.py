"""Postbacks and tracking-link clicks offered at a constant rate (openloop.py) to a running
platform: the latency a brand's server and a shopper see at a given load."""

from __future__ import annotations

import json
import os
import uuid

from ..platform_harness import Platform
from .end_to_end import platform_pids
from .measure import CpuMeter, say
from .openloop import Outcome, Request, run_at_rate, summarize


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _phase(name: str, platform_: Platform, url: str, rate: float, seconds: float, make, ok,
           method: str, per: str) -> dict:
    say(f"{name}: {rate:g}/s for {seconds:g}s, open loop")
    load_before = _load()
    meter = CpuMeter(platform_pids(platform_)).start()
    figures = run_at_rate(url, rate, seconds, make)
    meter.stop()
    result = summarize(figures.outcomes, rate, seconds, ok, figures.loop_cpu_seconds, figures.wall_seconds)
    result["method"] = method + (
        "; cpu_seconds: each process of `alpes up` from the first request to the last answer (work the "
        "consumers do after it, on events still queued, is not in it)")
    result["load_average"] = {"before": load_before, "after": _load()}
    done = len(figures.outcomes) - result["errors"]
    result["cpu_seconds"] = meter.spent
    result[f"cpu_seconds_per_1000_{per}"] = meter.per_thousand(done)
    say(f"{name}: achieved {result['achieved_per_s']}/s, {result['errors']} errors, latency {result['latency_ms']}, "
        f"generator saturated: {result['generator']['saturated']}")
    return result


def bench_postbacks_at_rate(platform_: Platform, setup: dict, rate: float, seconds: float) -> dict:
    """POST /conversiones with the brand's key, each with its own order id; a 200 is a durable
    conversion (the service answers after its commit)."""
    run_id = uuid.uuid4().hex[:8]
    headers = (("Content-Type", "application/json"),
               ("Authorization", setup["brand_headers"]["Authorization"]))

    def make(i: int) -> Request:
        body = json.dumps({"affiliate_id": setup["affiliate_id"], "campaign_id": setup["campaign_id"],
                           "user_id": f"user-{i % 997}", "conversion_value": f"{10 + i % 90}.{i % 100:02d}",
                           "conversion_type": "sale", "order_id": f"rate-{run_id}-{i}"}).encode()
        return Request("POST", "/conversiones", headers, body)

    def ok(outcome: Outcome) -> bool:
        return outcome.status == 200 and outcome.error is None

    return _phase("postbacks", platform_, platform_.urls["conversiones"], rate, seconds, make, ok,
                  "POST /conversiones with the brand's key, one new order id each, open loop at a constant rate; "
                  "latency from each request's intended send time; an error is anything but a 200",
                  "postbacks")


def bench_clicks_at_rate(platform_: Platform, setup: dict, rate: float, seconds: float) -> dict:
    """GET /r/{code} of the bench affiliate's tracking link, as new visitors (no cookie)."""
    headers = (("User-Agent", "alpes-bench"),)
    path = f"/r/{setup['link_code']}"

    def make(_i: int) -> Request:
        return Request("GET", path, headers)

    def ok(outcome: Outcome) -> bool:
        return outcome.status == 302 and outcome.error is None

    return _phase("clicks", platform_, platform_.urls["conversiones"], rate, seconds, make, ok,
                  "GET /r/{code} (public), a new visitor each, open loop at a constant rate; latency from each "
                  "request's intended send time; an error is anything but a 302", "clicks")
