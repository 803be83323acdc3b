"""The bench's open-loop generator: its schedule, latency counted from each request's intended
send time (a stall is not hidden), its saturation verdict, and reading CPU from /proc."""

from __future__ import annotations

import asyncio
import os
import threading
from contextlib import contextmanager

import pytest

from alpes.bench.measure import cpu_seconds, cpu_seconds_from_stat
from alpes.bench.openloop import (
    Outcome,
    Request,
    intended_times,
    latencies_from_intended,
    run_at_rate,
    run_count,
    summarize,
)


def test_the_schedule_is_one_request_every_1_over_rate_seconds_for_the_duration():
    times = intended_times(100.0, 4, 2.0)
    assert times == [100.0, 100.25, 100.5, 100.75, 101.0, 101.25, 101.5, 101.75]
    assert len(intended_times(0.0, 1000, 30)) == 30_000
    assert intended_times(0.0, 0, 30) == [] and intended_times(0.0, 10, 0) == []


def test_latency_counts_from_the_intended_send_time_so_a_stall_shows_in_every_request_behind_it():
    # 10/s: requests due at 0.0, 0.1, ... 0.9. The service stalls 1 s on the first one, and the
    # generator (a closed loop would have waited) only got to the others when it answered.
    outcomes = [Outcome(intended_at=i / 10) for i in range(10)]
    for i, o in enumerate(outcomes):
        o.started_at = o.intended_at if i == 0 else 1.0
        o.answered_at = 1.0 if i == 0 else 1.0 + 0.001 * i
        o.status = 200
    latencies = latencies_from_intended(outcomes)
    # Measured from their start the late ones took 1-9 ms; from their intended time, up to 901 ms.
    assert latencies[0] == pytest.approx(1.0)
    assert latencies[9] == pytest.approx(1.009 - 0.9)
    assert latencies[1] == pytest.approx(1.001 - 0.1)
    figures = summarize(outcomes, 10, 1.0, lambda o: o.status == 200, loop_cpu_seconds=0.01, wall_seconds=1.0)
    assert figures["latency_ms"]["max"] == pytest.approx(1000.0)
    # Sorted: 109, 208, ... 1000 ms; the nearest-rank median is the 5th, the request due at 0.5 s.
    assert figures["latency_ms"]["p50"] == pytest.approx(1000 * (1.005 - 0.5), abs=0.1)
    assert figures["errors"] == 0 and figures["offered_per_s"] == 10
    assert figures["achieved_per_s"] == pytest.approx(10 / 1.009, abs=0.1)
    # The generator started them up to 900 ms late: it did not keep its schedule.
    assert figures["generator"]["saturated"] is True
    assert figures["generator"]["start_lag_ms"]["max"] == pytest.approx(900.0)
    assert figures["generator"]["saturated_because"] == ["schedule"]


def test_errors_are_counted_and_a_generator_on_schedule_with_spare_cpu_is_not_saturated():
    outcomes = []
    for i in range(100):
        o = Outcome(intended_at=i / 100, started_at=i / 100 + 0.0001, answered_at=i / 100 + 0.002, status=200)
        if i % 10 == 0:
            o.status = 429
        outcomes.append(o)
    outcomes[5].status, outcomes[5].error = None, "ConnectionResetError"
    figures = summarize(outcomes, 100, 1.0, lambda o: o.status == 200 and o.error is None,
                        loop_cpu_seconds=0.2, wall_seconds=1.0)
    assert figures["errors"] == 11
    assert figures["error_kinds"] == {"http_429": 10, "ConnectionResetError": 1}
    assert figures["latency_ms"]["p99"] == pytest.approx(2.0)
    assert figures["generator"]["saturated"] is False
    busy = summarize(outcomes, 100, 1.0, lambda o: o.status == 200, loop_cpu_seconds=0.95, wall_seconds=1.0)
    assert busy["generator"]["saturated"] is True  # on schedule, but out of CPU
    assert busy["generator"]["saturated_because"] == ["cpu"]


def test_cpu_seconds_are_read_after_the_parenthesised_command_name():
    fields = ["S", "1", "2", "3", "0", "-1", "4194560", "10", "0", "0", "0", "250", "50"] + ["0"] * 39
    stat = "4242 (python (bench) x) " + " ".join(fields)
    assert cpu_seconds_from_stat(stat, 100) == pytest.approx(3.0)
    spent = cpu_seconds(os.getpid())
    assert spent is not None and spent > 0
    assert cpu_seconds(2 ** 22 + 12345) is None  # no such process


@contextmanager
def _scratch_server(seen: list[bytes], close_after_answer: bool = False, answer_after: float = 0.0,
                    in_flight: list[int] | None = None):
    """A real socket: an HTTP/1.1 server answering alternately with Content-Length and chunked;
    `close_after_answer`: it closes each connection once it answered, without saying so (as a
    keep-alive timeout firing just as the client reuses the connection); `answer_after`: seconds
    it takes to answer, `in_flight`: [now, most] requests it held at once. Yields its port."""
    ready = threading.Event()
    address: list[int] = []
    stop: list[asyncio.AbstractEventLoop] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                seen.append(head.split(b"\r\n")[0] + b" " + body)
                if in_flight is not None:
                    in_flight[0] += 1
                    in_flight[1] = max(in_flight)
                await asyncio.sleep(answer_after)
                if in_flight is not None:
                    in_flight[0] -= 1
                if len(seen) % 2:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                else:
                    writer.write(b"HTTP/1.1 302 Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
                await writer.drain()
                if close_after_answer:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def serve() -> None:
        async def main() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            address.append(server.sockets[0].getsockname()[1])
            stop.append(asyncio.get_running_loop())
            ready.set()
            async with server:
                await server.serve_forever()

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        yield address[0]
    finally:
        # Cancel from inside the loop's own thread, in one call: cancelling task by task from here
        # lets the loop end (and close) between two calls.
        def cancel_all() -> None:
            for task in asyncio.all_tasks():
                task.cancel()

        stop[0].call_soon_threadsafe(cancel_all)
        thread.join(5)


def test_the_generator_sends_at_the_rate_and_reads_length_and_chunked_answers():
    seen: list[bytes] = []
    with _scratch_server(seen) as port:
        figures = run_at_rate(f"http://127.0.0.1:{port}", 50, 0.4,
                              lambda i: Request("POST", f"/x/{i}", (("Content-Type", "text/plain"),), b"b%d" % i))
    assert len(figures.outcomes) == 20
    assert sorted(seen) == sorted(b"POST /x/%d HTTP/1.1 b%d" % (i, i) for i in range(20))
    assert {o.status for o in figures.outcomes} == {200, 302}
    assert {o.body for o in figures.outcomes} == {b"ok", b"abc"}
    assert all(o.error is None for o in figures.outcomes)
    # Sent on schedule: the last was due 19/50 s after the first, and none started before its time.
    assert figures.outcomes[-1].intended_at - figures.outcomes[0].intended_at == pytest.approx(19 / 50)
    assert all(o.started_at >= o.intended_at for o in figures.outcomes)


def test_a_kept_alive_connection_the_server_closed_is_not_an_error_the_request_goes_on_a_new_one():
    seen: list[bytes] = []
    with _scratch_server(seen, close_after_answer=True) as port:
        figures = run_at_rate(f"http://127.0.0.1:{port}", 50, 0.4, lambda i: Request("GET", f"/r/{i}", (), b""))
    assert [o.error for o in figures.outcomes] == [None] * 20
    assert sorted(seen) == sorted(b"GET /r/%d HTTP/1.1 " % i for i in range(20))  # each sent once, answered once


def test_a_counted_run_keeps_at_most_its_concurrency_in_flight_and_times_each_from_its_send():
    """The end-to-end run's sender: as fast as answered, never more than `concurrency` at once;
    each request's send time is when it got a connection, not when it was queued."""
    seen: list[bytes] = []
    in_flight = [0, 0]
    with _scratch_server(seen, answer_after=0.02, in_flight=in_flight) as port:
        figures = run_count(f"http://127.0.0.1:{port}", 30, lambda i: Request("POST", f"/p/{i}", (), b"%d" % i),
                            concurrency=3)
    assert sorted(seen) == sorted(b"POST /p/%d HTTP/1.1 %d" % (i, i) for i in range(30))
    assert in_flight == [0, 3]
    assert all(o.error is None and o.status in (200, 302) for o in figures.outcomes)
    # 30 answers of 20 ms, 3 at a time: 10 rounds. Each waited for a free connection, then ~20 ms.
    waits = sorted(o.sent_at - o.intended_at for o in figures.outcomes)
    assert waits[-1] >= 0.15
    assert all(0.019 <= o.answered_at - o.sent_at < 0.5 for o in figures.outcomes)
