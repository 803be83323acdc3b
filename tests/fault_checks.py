"""Rows of the fault suite's table about what its own retries absorbed and how the sagas ended:
the 5xx answers of live services, the refund retries, valid conversions rejected, and the
conversion → commission sagas still waiting or once stuck. Each row says its rule."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

from fault_observations import GRACE_SECONDS, Incident, Observer, Window

# A 503 is the one 5xx a service may answer, and only while a dependency is down on purpose: the
# embedded broker restarting after a service left (/health), the held or killed process itself.
ALLOWED_5XX = 503
# The causes a refund may be retried for, inside a fault window: the service did not answer, or
# answered 503. Anything else (a 409 while the conversion is not yet validated, a 404, a 500) is a bug.
REFUND_RETRY_CAUSES = ("no answer", "503")
_SAGA_IN_ALERT = re.compile(r"^saga (\S+) stuck")


@dataclass
class Row:
    check: str
    expected: object
    observed: object
    ok: bool
    settled: bool = False  # about the faults themselves: waiting for the drain cannot change it


def fault_windows(chaos, observer: Observer) -> list[Window]:
    """Each kill and hold of the chaos plan, from its start until the process answered again, and
    each broker restart by `alpes up` seen in state.json (each holds for GRACE_SECONDS more)."""
    now = time.monotonic()
    planned = [Window(e.started_at, e.done_at or now, f"{e.action} {e.target}")
               for e in chaos if e.action in ("kill", "hold") and e.started_at]
    return planned + list(observer.supervisor_windows)


def _inside(span: tuple[float, float], windows: list[Window]) -> bool:
    """Whether a request (sent, answered or given up) met a fault window."""
    return any(w.holds(*span) for w in windows)


def _listed(observer: Observer, incidents: list[Incident], most: int = 4) -> str:
    shown = [f"{i.status or 'no answer'} {i.service} {i.method} {i.path} at {observer.rel(i.at)}s"
             for i in incidents[:most]]
    return "; ".join(shown) + (f"; +{len(incidents) - most} more" if len(incidents) > most else "")


def server_error_rows(observer: Observer, windows: list[Window]) -> list[Row]:
    """Every 5xx answer any service gave the suite (postbacks, refunds, reads, probes, /health,
    the final reads), and the requests left without an answer (shown, not judged: a killed
    process refuses connections)."""
    with observer.lock:
        incidents = list(observer.incidents)
    errors = [i for i in incidents if i.status >= 500]
    allowed = [i for i in errors if i.status == ALLOWED_5XX and _inside(i.span, windows)]
    wrong = [i for i in errors if i not in allowed]
    silent = [i for i in incidents if i.status == 0]
    silent_outside = [i for i in silent if not _inside(i.span, windows)]
    per_service = dict(Counter(i.service for i in allowed))
    return [
        Row(f"5xx answers: 503 while a dependency was killed or held (±{GRACE_SECONDS:g} s), per service",
            "counted", f"{len(allowed)} {per_service or ''}".strip(), True, settled=True),
        Row("5xx answers outside that rule (any 500, or a 503 outside every fault window)", 0,
            f"{len(wrong)}" + (f": {_listed(observer, wrong)}" if wrong else ""), not wrong, settled=True),
        Row("  requests left without an answer (refused, reset, timed out): inside / outside fault windows",
            "shown", f"{len(silent) - len(silent_outside)} / {len(silent_outside)}"
            + (f": {_listed(observer, silent_outside)}" if silent_outside else ""), True, settled=True),
    ]


def refund_retry_row(observer: Observer, windows: list[Window]) -> Row:
    """A refund is retried only when the service could not take it: no answer or a 503, inside a
    fault window. So each retry is a fault absorbed, never a refund refused for another reason."""
    with observer.lock:
        retries = list(observer.refund_retries)
    wrong = [r for r in retries if r.cause not in REFUND_RETRY_CAUSES or not _inside(r.span, windows)]
    causes = dict(Counter(r.cause for r in retries))
    return Row("refund retries: only after no answer or a 503, and only inside a fault window",
               "0 outside the rule", f"{len(retries)} retries" + (f" {causes}" if causes else "")
               + f", {len(wrong)} outside the rule"
               + (": " + "; ".join(f"{r.cause} at {observer.rel(r.at)}s" for r in wrong[:4]) if wrong else ""),
               not wrong, settled=True)


def valid_rejected_row(mine: dict, status: dict[str, str], view: dict) -> Row:
    """A valid conversion (a valid postback, or one of a velocity burst below the limit) is never
    rejected: not by validation, not by a compensation for an answer that came late."""
    valid = [i for i, c in mine.items() if c.kind == "valid" or (c.kind == "velocity" and not c.held)]
    reasons = Counter((view.get(i) or {}).get("reason") or "?" for i in valid if status[i] == "rejected")
    total = sum(reasons.values())
    # Settled: a rejection is final, waiting for the drain cannot undo it.
    return Row("valid conversions rejected (compensated)", 0, f"{total}" + (f" {dict(reasons)}" if total else ""),
               total == 0, settled=True)


def saga_rows(snap: dict, status: dict[str, str]) -> list[Row]:
    """Sagas still waiting on marketing (running or stuck) at the end: none. A row whose /sagas
    read failed fails and says why. Sagas that got stuck during the run (one SagaAtascada alert
    each): every one completed afterwards, none compensated."""
    rows = []
    for estado, check in (("running", "conversion sagas still running (not completed or compensated)"),
                          ("stuck", "conversion sagas stuck (no answer from marketing past every retry)")):
        found = snap["sagas"][estado]
        if isinstance(found, str):
            rows.append(Row(check, 0, f"not known: GET /sagas?estado={estado} {found}", False))
        else:
            rows.append(Row(check, 0, len(found), not found))
    stuck = {m[1] for a in snap["alertas"]
             if a["tipo"] == "saga_atascada" and (m := _SAGA_IN_ALERT.match(a["mensaje"]))}
    ended = Counter(status.get(s, "not sent by the suite") for s in stuck)
    good = sum(n for s, n in ended.items() if s in ("validated", "refunded"))
    rows.append(Row("  sagas stuck during the run (alerted): each then completed, none compensated",
                    f"{len(stuck)} completed", f"{good} completed" + (f" {dict(ended)}" if good != len(stuck) else ""),
                    good == len(stuck)))
    return rows
