"""An open-loop, constant-rate HTTP load generator: request i is due at start + i/rate whatever
happened to the ones before it, and its latency is counted from that intended send time, so a
stall of the service (or of the generator) shows in the percentiles instead of silently
lowering the offered rate (coordinated omission).

It runs on one asyncio loop with a small HTTP/1.1 client of its own over keep-alive
connections: uvicorn answers with Content-Length or chunked bodies, which is all it reads. A
general client (httpx) costs several times the CPU per request, and at 1,000 requests/s on a
2-core machine the generator must not be what limits the result. It measures its own CPU
(the loop thread's) and how late it was in starting each request, and says `saturated` when
it could not keep its schedule.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .measure import latency_summary_ms, percentile

# The generator is saturated when it started a request this late (p99 of its own lag) or used
# this share of the one core its loop can use: then the figures are the generator's, not the
# service's.
SATURATED_LAG_P99_S = 0.010
SATURATED_CPU_SHARE = 0.90


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass
class Outcome:
    intended_at: float  # the schedule's send time (perf_counter)
    started_at: float = 0.0  # when the generator got to it (its own lag: started - intended)
    sent_at: float = 0.0  # when it got a connection and was written (after waiting for a free one)
    answered_at: float = 0.0
    status: int | None = None
    body: bytes = b""
    error: str | None = None


@dataclass
class RunFigures:
    outcomes: list[Outcome]
    first_intended: float
    last_answered: float
    loop_cpu_seconds: float
    wall_seconds: float
    extra: dict = field(default_factory=dict)


def intended_times(start: float, rate: float, duration: float) -> list[float]:
    """The schedule: request i at start + i/rate, for every i with i/rate < duration."""
    if rate <= 0 or duration <= 0:
        return []
    count = int(round(rate * duration))
    return [start + i / rate for i in range(count)]


def latencies_from_intended(outcomes: list[Outcome]) -> list[float]:
    """Seconds from each answered request's intended send time to its answer."""
    return [o.answered_at - o.intended_at for o in outcomes if o.answered_at]


def summarize(outcomes: list[Outcome], rate: float, duration: float, ok: Callable[[Outcome], bool],
              loop_cpu_seconds: float, wall_seconds: float) -> dict:
    """The figures of one run: offered and achieved rate, errors, latency from the intended send
    time, and whether the generator kept up."""
    answered_ok = [o for o in outcomes if o.answered_at and ok(o)]
    errors = len(outcomes) - len(answered_ok)
    first = min((o.intended_at for o in outcomes), default=0.0)
    last = max((o.answered_at for o in outcomes if o.answered_at), default=first)
    span = last - first
    lags = sorted(max(0.0, o.started_at - o.intended_at) for o in outcomes if o.started_at)
    lag_p99 = percentile(lags, 99) or 0.0
    cpu_share = loop_cpu_seconds / wall_seconds if wall_seconds > 0 else 0.0
    latency = latency_summary_ms(latencies_from_intended(outcomes))
    samples: dict[str, int] = {}
    for o in outcomes:
        if not (o.answered_at and ok(o)):
            key = o.error or f"http_{o.status}"
            samples[key] = samples.get(key, 0) + 1
    return {
        "offered_per_s": rate,
        "duration_s": duration,
        "requests": len(outcomes),
        # Successful answers over the time from the first intended send to the last answer.
        "achieved_per_s": round(len(answered_ok) / span, 1) if span > 0 else None,
        "errors": errors,
        "error_kinds": dict(sorted(samples.items(), key=lambda kv: -kv[1])[:5]),
        "latency_ms": {k: latency[k] for k in ("p50", "p95", "p99", "max")} if latency.get("count") else {},
        "latency_detail_ms": latency,
        "generator": {
            "cpu_seconds": round(loop_cpu_seconds, 3),
            "cpu_share_of_one_core": round(cpu_share, 3),
            "start_lag_ms": {"p50": round(1000 * (percentile(lags, 50) or 0.0), 2),
                             "p99": round(1000 * lag_p99, 2), "max": round(1000 * (lags[-1] if lags else 0.0), 2)},
            "saturated": lag_p99 > SATURATED_LAG_P99_S or cpu_share > SATURATED_CPU_SHARE,
            # "cpu": its loop used (nearly) a whole core; "schedule": it started requests late (its
            # own CPU, or a machine too busy to run it on time). Either way the offered rate was not
            # quite constant; the latencies still count from the intended times.
            "saturated_because": [reason for reason, hit in (("cpu", cpu_share > SATURATED_CPU_SHARE),
                                                             ("schedule", lag_p99 > SATURATED_LAG_P99_S)) if hit],
        },
    }


# -- the HTTP/1.1 client --------------------------------------------------------------------------
class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def exchange(self, raw: bytes) -> tuple[int, bytes, bool]:
        """Send one request; (status, body, keep the connection)."""
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(p[:-2] for p in parts)
        elif length is not None:
            body = await self.reader.readexactly(length)
        else:
            body, close = await self.reader.read(), True
        return status, body, not close

    def close(self) -> None:
        self.writer.close()


def _raw(request: Request, host: str) -> bytes:
    head = [f"{request.method} {request.path} HTTP/1.1", f"Host: {host}"]
    head += [f"{k}: {v}" for k, v in request.headers]
    if request.body or request.method in ("POST", "PUT", "PATCH"):
        head.append(f"Content-Length: {len(request.body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + request.body


async def _run(host: str, port: int, schedule: list[float], make: Callable[[int], Request],
               max_connections: int, timeout: float) -> list[Outcome]:
    outcomes = [Outcome(t) for t in schedule]
    idle: list[_Connection] = []
    opened = [0]
    slots = asyncio.Semaphore(max_connections)
    host_header = f"{host}:{port}"

    async def send(i: int) -> None:
        outcome = outcomes[i]
        outcome.started_at = time.perf_counter()
        raw = _raw(make(i), host_header)
        async with slots:  # more in flight than connections: they queue here, and it counts
            outcome.sent_at = time.perf_counter()
            connection = idle.pop() if idle else None
            try:
                if connection is not None:
                    try:
                        status, body, keep = await asyncio.wait_for(connection.exchange(raw), timeout)
                    except (ConnectionError, asyncio.IncompleteReadError) as error:
                        if isinstance(error, asyncio.IncompleteReadError) and error.partial:
                            raise
                        # The server closed this idle keep-alive connection (uvicorn after 5 s) as it
                        # was reused: nothing was answered, so send again on a new one, as HTTP
                        # clients do (RFC 9112 9.3.1). The latency still counts from the intended time.
                        connection.close()
                        connection = None
                if connection is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                    connection = _Connection(reader, writer)
                    opened[0] += 1
                    status, body, keep = await asyncio.wait_for(connection.exchange(raw), timeout)
                outcome.answered_at = time.perf_counter()
                outcome.status, outcome.body = status, body
                if keep:
                    idle.append(connection)
                else:
                    connection.close()
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as error:
                # A failure counts at the moment it is known: a 30 s timeout is a 30 s latency.
                outcome.answered_at = time.perf_counter()
                outcome.error = type(error).__name__
                if connection is not None:
                    connection.close()

    tasks = []
    i = 0
    while i < len(schedule):
        now = time.perf_counter()
        while i < len(schedule) and schedule[i] <= now:  # everything due (late ones at once)
            tasks.append(asyncio.ensure_future(send(i)))
            i += 1
        if i < len(schedule):
            await asyncio.sleep(max(0.0, schedule[i] - time.perf_counter()))
    await asyncio.gather(*tasks)
    for connection in idle:
        connection.close()
    return outcomes


def run_at_rate(base_url: str, rate: float, duration: float, make: Callable[[int], Request], *,
                max_connections: int = 256, timeout: float = 30.0) -> RunFigures:
    """Send make(i) at `rate`/s for `duration` s to `base_url` (http://host:port), open loop, on
    a thread of its own (its CPU is that thread's alone)."""
    return _run_schedule(base_url, lambda start: intended_times(start, rate, duration), make, max_connections, timeout)


def run_count(base_url: str, count: int, make: Callable[[int], Request], *, concurrency: int,
              rate: float = 0.0, timeout: float = 60.0) -> RunFigures:
    """Send make(i) for i < count with at most `concurrency` in flight: as fast as the service
    answers (rate 0: a closed loop, each connection sending its next request when answered), or
    due at start + i/rate (late ones as soon as a connection is free)."""
    return _run_schedule(base_url, lambda start: [start + (i / rate if rate > 0 else 0.0) for i in range(count)],
                         make, concurrency, timeout)


def _run_schedule(base_url: str, schedule_from: Callable[[float], list[float]], make: Callable[[int], Request],
                  max_connections: int, timeout: float) -> RunFigures:
    address = base_url.split("://", 1)[1].rstrip("/")
    host, _, port = address.partition(":")
    result: dict = {}

    def loop_thread() -> None:
        cpu_before = time.thread_time()
        start = time.perf_counter() + 0.1
        schedule = schedule_from(start)
        try:
            result["outcomes"] = asyncio.run(_run(host, int(port or 80), schedule, make, max_connections, timeout))
        except BaseException as error:  # re-raised on the caller's thread
            result["error"] = error
        result["cpu"] = time.thread_time() - cpu_before
        result["start"] = start

    thread = threading.Thread(target=loop_thread, name="open-loop", daemon=True)
    wall_started = time.perf_counter()
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    outcomes = result["outcomes"]
    last = max((o.answered_at for o in outcomes if o.answered_at), default=result["start"])
    return RunFigures(outcomes, result["start"], last, result["cpu"], time.perf_counter() - wall_started)
