"""Fixed-window rate limits per (limit, subject): postbacks and tracking links, per key and per IP.

Counters live in Redis when a URL is given, so every instance of a service shares them (a client
cannot multiply its allowance by the number of replicas); without a URL they live in this process.
A Redis outage must never turn into a 5xx: `hit` falls back to the in-process counter, reports the
outage once through `on_degraded` (the service announces ServicioDegradado), probes Redis again
after a back-off and reports `on_recovered` once it answers.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

log = structlog.get_logger(__name__)

KEY_PREFIX = "alpes:rl:"
RETRY_REDIS_AFTER = 5.0  # seconds on the in-process counter before Redis is tried again
SOCKET_TIMEOUT = 0.2  # a dead Redis costs one request 0.2 s, not a stalled worker

# INCR and set the expiry in one round trip; the window is in the key, the TTL only cleans up.
_INCR = "local n = redis.call('INCR', KEYS[1]) if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end return n"


@dataclass(frozen=True)
class RateLimit:
    name: str  # e.g. "postback-key", "tracking-ip"
    limit: int  # hits allowed per window
    window_seconds: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: int  # whole seconds until the window ends (>= 1 when refused, 0 when allowed)


def connect(url: str) -> redis.Redis:
    """A client that fails fast: short timeouts and no retries (redis-py retries 10 times by default)."""
    return redis.Redis.from_url(url, socket_connect_timeout=SOCKET_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
                                retry=Retry(NoBackoff(), 0))


class _LocalCounter:
    """The same fixed windows in this process's memory, safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], tuple[int, float, int]] = {}  # -> (window, ends_at, count)
        self._pruned_at = 0.0

    def incr(self, limit: RateLimit, subject: str, window: int, ends_at: float, now: float) -> int:
        with self._lock:
            # Drop finished windows now and then, or every IP ever seen would stay in memory.
            if now - self._pruned_at >= 1.0:
                self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
                self._pruned_at = now
            seen_window, _, count = self._counts.get((limit.name, subject), (window, ends_at, 0))
            count = count + 1 if seen_window == window else 1
            self._counts[(limit.name, subject)] = (window, ends_at, count)
            return count


class RateLimiter:
    def __init__(self, redis_url: str | None, on_degraded: Callable[[str], None] | None = None,
                 on_recovered: Callable[[], None] | None = None, clock: Callable[[], float] = time.time, *,
                 client_factory: Callable[[str], redis.Redis] = connect) -> None:
        self.redis_url = redis_url
        self.on_degraded = on_degraded
        self.on_recovered = on_recovered
        self.clock = clock
        self._client_factory = client_factory
        # The INCR script on its client, both created on first use: no connection at import or start.
        self._script = None
        self._local = _LocalCounter()
        self._lock = threading.Lock()
        self._degraded = False
        self._retry_at = 0.0

    def hit(self, limit: RateLimit, subject: str) -> Decision:
        """Count one hit of `subject` against `limit`. Never raises."""
        now = self.clock()
        window = int(now // limit.window_seconds)
        ends_at = (window + 1) * limit.window_seconds
        count = self._redis_incr(limit, subject, window, now) if self.redis_url else None
        if count is None:
            count = self._local.incr(limit, subject, window, ends_at, now)
        if count <= limit.limit:
            return Decision(True, 0)
        return Decision(False, max(1, math.ceil(ends_at - now)))

    def describe(self) -> dict:
        """For /health: the backend counting right now, and whether that is a fallback from Redis."""
        return {"backend": "redis" if self.redis_url and not self._degraded else "in-process",
                "degraded": self._degraded}

    def _redis_incr(self, limit: RateLimit, subject: str, window: int, now: float) -> int | None:
        with self._lock:
            if self._degraded:
                if now < self._retry_at:
                    return None
                # This hit probes Redis; the others keep counting locally until it answers.
                self._retry_at = now + RETRY_REDIS_AFTER
        # Subjects are IPs ("::1"), key ids...: hashed, so no character can break or collide the key.
        digest = hashlib.sha256(subject.encode()).hexdigest()[:32]
        key = f"{KEY_PREFIX}{limit.name}:{digest}:{window}"
        try:
            script = self._script
            if script is None:
                # Under the lock: a thread that saw a client without its script yet called None and
                # degraded to counting in-process, where a burst got past the limit (CI saw 573 of 300).
                with self._lock:
                    if self._script is None:
                        self._script = self._client_factory(self.redis_url).register_script(_INCR)
                    script = self._script
            count = int(script(keys=[key], args=[limit.window_seconds + 1]))
        except Exception as error:  # RedisError, a bad URL, anything: a limit must never become a 5xx
            with self._lock:
                first = not self._degraded
                self._degraded = True
                self._retry_at = now + RETRY_REDIS_AFTER
            if first:
                log.warning("rate limits degraded to in-process", error=str(error)[:200])
                self._notify(self.on_degraded, f"redis unreachable: {error}"[:300])
            return None
        with self._lock:
            recovered, self._degraded = self._degraded, False
        if recovered:
            log.info("rate limits back on redis")
            self._notify(self.on_recovered)
        return count

    @staticmethod
    def _notify(callback: Callable | None, *args) -> None:
        # The callback announces an event (its database may be down too); that is no reason to fail a hit.
        if callback is None:
            return
        try:
            callback(*args)
        except Exception as error:
            log.warning("rate limit callback failed", error=str(error)[:200])
