"""Rate limits (kernel/ratelimit.py) against the real Redis server, and in-process.

Redis runs on 127.0.0.1:6379 (CI starts it). Like MariaDB in conftest.py, a missing server skips
these tests locally and fails them when ALPES_REQUIRE_MARIADB is set (CI's "all servers" switch).
"""

from __future__ import annotations

import sys
import threading

import pytest
import redis

from alpes.kernel import ratelimit
from alpes.kernel.ratelimit import Decision, RateLimit, RateLimiter

CLOSED_PORT_URL = "redis://127.0.0.1:1/0"


@pytest.fixture(params=["redis", "in-process"])
def backend_url(request):
    return request.getfixturevalue("redis_url") if request.param == "redis" else None


class Clock:
    """Injected time: windows advance without sleeping."""

    def __init__(self, now: float = 60 * 1_000_000 + 10.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingFactory:
    """Builds real clients (ratelimit.connect) and counts every command sent to Redis; `down` makes them fail."""

    def __init__(self) -> None:
        self.created = 0
        self.commands = 0
        self.down = False

    def __call__(self, url: str) -> redis.Redis:
        self.created += 1
        client = ratelimit.connect(url)
        real = client.execute_command

        def execute_command(*args, **kwargs):
            self.commands += 1
            if self.down:
                raise redis.ConnectionError("simulated outage")
            return real(*args, **kwargs)

        client.execute_command = execute_command
        return client


def test_limit_per_window(backend_url):
    clock = Clock()  # 10 s into a 60 s window
    limiter = RateLimiter(backend_url, clock=clock)
    limit = RateLimit("postback-key", limit=3, window_seconds=60)

    assert [limiter.hit(limit, "key-1") for _ in range(3)] == [Decision(True, 0)] * 3
    refused = limiter.hit(limit, "key-1")
    assert not refused.allowed
    assert 1 <= refused.retry_after <= 60
    assert refused.retry_after == 50

    clock.now += 49.5  # half a second left: still refused, and never "retry after 0"
    assert limiter.hit(limit, "key-1") == Decision(False, 1)

    clock.now += 0.5  # the next window
    assert limiter.hit(limit, "key-1").allowed
    assert [limiter.hit(limit, "key-1").allowed for _ in range(3)] == [True, True, False]


def test_instances_share_counters_in_redis(redis_url):
    clock = Clock()
    first, second = RateLimiter(redis_url, clock=clock), RateLimiter(redis_url, clock=clock)
    limit = RateLimit("tracking-ip", limit=4, window_seconds=60)

    assert all(first.hit(limit, "10.0.0.1").allowed for _ in range(2))
    assert all(second.hit(limit, "10.0.0.1").allowed for _ in range(2))
    assert not first.hit(limit, "10.0.0.1").allowed
    assert not second.hit(limit, "10.0.0.1").allowed
    assert first.describe() == second.describe() == {"backend": "redis", "degraded": False}


def test_instances_without_redis_count_apart():
    limit = RateLimit("tracking-ip", limit=1, window_seconds=60)
    first, second = RateLimiter(None), RateLimiter(None)
    assert first.hit(limit, "10.0.0.1").allowed and second.hit(limit, "10.0.0.1").allowed
    assert first.describe() == {"backend": "in-process", "degraded": False}


def test_subjects_and_limits_are_independent(backend_url):
    limiter = RateLimiter(backend_url, clock=Clock())
    per_ip = RateLimit("tracking-ip", limit=2, window_seconds=60)
    per_key = RateLimit("postback-key", limit=2, window_seconds=60)
    subjects = ["1.2.3.4", "::1", "a b:c*", "alpes:rl:*", "clé-ñ/\n", ""]

    for subject in subjects:
        assert [limiter.hit(per_ip, subject).allowed for _ in range(3)] == [True, True, False], subject
    for subject in subjects:  # another limit on the same subjects starts from zero
        assert limiter.hit(per_key, subject).allowed, subject

    if backend_url:
        keys = [key.decode() for key in redis.Redis.from_url(backend_url).keys("*")]
        assert len(keys) == 2 * len(subjects)
        assert all(key.startswith("alpes:rl:") for key in keys)
        assert not any(raw in key for key in keys for raw in ("1.2.3.4", "::1", "a b"))


def test_redis_outage_degrades_to_in_process_once():
    clock = Clock()
    factory = CountingFactory()
    reasons: list[str] = []
    limiter = RateLimiter(CLOSED_PORT_URL, on_degraded=reasons.append, clock=clock, client_factory=factory)
    limit = RateLimit("postback-key", limit=5, window_seconds=60)

    assert factory.created == 0  # lazily: nothing until the first hit
    decisions = [limiter.hit(limit, "key-1") for _ in range(50)]

    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 45  # still limited, in-process
    assert decisions[-1].retry_after == 50
    assert len(reasons) == 1 and reasons[0].startswith("redis unreachable: ")
    assert factory.commands == 1  # only the first hit went to Redis; the rest did not wait on it
    assert limiter.describe() == {"backend": "in-process", "degraded": True}

    clock.now += ratelimit.RETRY_REDIS_AFTER  # back-off over: one hit probes Redis again, still down
    for _ in range(20):
        limiter.hit(limit, "key-1")
    assert factory.commands == 2
    assert len(reasons) == 1


def test_failing_callbacks_never_fail_a_hit():
    def explode(*_):
        raise RuntimeError("database down too")

    limiter = RateLimiter(CLOSED_PORT_URL, on_degraded=explode, on_recovered=explode)
    assert limiter.hit(RateLimit("tracking-ip", 1, 60), "1.2.3.4").allowed
    assert not limiter.hit(RateLimit("tracking-ip", 1, 60), "1.2.3.4").allowed


def test_bad_url_degrades_instead_of_raising():
    reasons: list[str] = []
    limiter = RateLimiter("not-a-redis-url", on_degraded=reasons.append)
    assert limiter.hit(RateLimit("tracking-ip", 1, 60), "1.2.3.4").allowed
    assert len(reasons) == 1


def test_recovery_goes_back_to_redis(redis_url):
    clock = Clock()
    factory = CountingFactory()
    events: list[str] = []
    limiter = RateLimiter(redis_url, on_degraded=lambda reason: events.append("degraded"),
                          on_recovered=lambda: events.append("recovered"), clock=clock, client_factory=factory)
    other = RateLimiter(redis_url, clock=clock)  # another instance, always on Redis
    limit = RateLimit("postback-key", limit=3, window_seconds=60)
    direct = redis.Redis.from_url(redis_url)

    assert limiter.hit(limit, "key-1").allowed  # healthy: counted in Redis
    assert len(direct.keys("alpes:rl:*")) == 1

    factory.down = True
    assert all(limiter.hit(limit, "key-1").allowed for _ in range(2))  # counted in-process meanwhile
    assert events == ["degraded"]
    assert other.hit(limit, "key-1").allowed  # Redis saw 2 hits only: the outage's hits stayed local

    factory.down = False
    clock.now += 1  # within the back-off Redis is not tried even though it is back
    commands = factory.commands
    limiter.hit(limit, "key-1")
    assert factory.commands == commands and events == ["degraded"]

    clock.now += ratelimit.RETRY_REDIS_AFTER
    # Redis counts its 3rd hit (allowed); the in-process counter, at 3 already, would have refused.
    assert limiter.hit(limit, "key-1").allowed
    assert events == ["degraded", "recovered"]
    [key] = direct.keys("alpes:rl:*")
    assert int(direct.get(key)) == 3
    assert limiter.describe() == {"backend": "redis", "degraded": False}
    for _ in range(5):
        limiter.hit(limit, "key-1")
    assert events == ["degraded", "recovered"]
    assert factory.created == 1  # the same client reconnects; no new one per outage


def hammer(limiter: RateLimiter, limit: RateLimit, threads: int, hits: int) -> int:
    """Hits from `threads` threads at once; the number allowed. The GIL switches threads every
    microsecond meanwhile, or an unlocked read-modify-write would rarely be caught interleaving."""
    allowed = [0] * threads
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def run(index: int) -> None:
        allowed[index] = sum(limiter.hit(limit, "same-subject").allowed for _ in range(hits))

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    return sum(allowed)


def test_in_process_counter_is_thread_safe():
    limiter = RateLimiter(None, clock=Clock())
    assert hammer(limiter, RateLimit("tracking-ip", limit=5000, window_seconds=60), threads=8, hits=1000) == 5000


def test_redis_counter_is_exact_under_threads(redis_url):
    limiter = RateLimiter(redis_url, clock=Clock())
    assert hammer(limiter, RateLimit("tracking-ip", limit=300, window_seconds=60), threads=8, hits=100) == 300


def test_threads_arriving_while_the_client_is_made_all_count_on_redis(redis_url):
    """The first hits of a process come together: those arriving while the first one makes the
    client and registers its script wait for it, rather than find no script, fall back to counting
    in-process and let a burst past the limit (CI once allowed 573 of 300)."""
    import time

    def slow_to_register(url: str) -> redis.Redis:
        client = ratelimit.connect(url)
        register = client.register_script

        def registering(script):
            time.sleep(0.05)  # the others arrive meanwhile
            return register(script)
        client.register_script = registering
        return client

    limiter = RateLimiter(redis_url, clock=Clock(), client_factory=slow_to_register)
    assert hammer(limiter, RateLimit("tracking-ip", limit=30, window_seconds=60), threads=8, hits=10) == 30
    assert limiter.describe() == {"backend": "redis", "degraded": False}
