"""Fault injection through the running platform: a mixed load of conversions (valid, duplicate,
fraudulent, refunded) while every process is SIGKILLed once, one service is held down, and a
poison message lands on every topic; then every invariant is checked and printed as a table.

The default run is small and runs on one MariaDB database per service when the test server is
there (CI requires it: ALPES_REQUIRE_MARIADB), else on SQLite; the slow one (`make test-slow`, CI)
sends 10,000 conversions on SQLite. So CI runs the suite on both. The long one runs alone with a
chosen size, seed and databases:

    ALPES_FAULT_CONVERSIONS=20000 ALPES_FAULT_SEED=7 .venv/bin/pytest tests/test_faults.py -m slow -s
    ALPES_FAULT_DATABASES=mariadb ...   # or sqlite: overrides both runs' choice

The same suite on a real Apache Pulsar standalone (`alpes up --broker pulsar`, JWT and authorization
on) and one MariaDB database per service, 300 conversions, marked `pulsar` (`make test-pulsar`):

    ALPES_FAULT_SEED=7 .venv/bin/pytest tests/test_faults.py -m pulsar -s
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest
from conftest import REQUIRE_MARIADB, mariadb_available
from faultsuite import console_printer, run_fault_suite


def _seed() -> int:
    seed = os.environ.get("ALPES_FAULT_SEED")
    return int(seed) if seed else random.SystemRandom().randint(1, 10**6)


def _databases(default: str) -> str:
    return os.environ.get("ALPES_FAULT_DATABASES") or default


def _run(tmp_path, capsys, conversions: int, hold_seconds: float, databases: str, broker: str = "embedded") -> None:
    with capsys.disabled():  # the table belongs in the test's output, with or without -s
        print()
        rows = run_fault_suite(tmp_path / "alpes", conversions=conversions, seed=_seed(), hold_seconds=hold_seconds,
                               hold_service=os.environ.get("ALPES_FAULT_HOLD_SERVICE") or None,
                               databases=databases, broker=broker, out=console_printer())
    failed = [f"{r.check}: expected {r.expected}, observed {r.observed}" for r in rows if not r.ok]
    assert rows and not failed, "\n".join(failed)


def test_faults_small_load_every_invariant_holds(tmp_path, capsys):
    # MariaDB per service when the server is there (or required: then its absence fails), else SQLite.
    on_mariadb = REQUIRE_MARIADB or mariadb_available()
    _run(tmp_path, capsys, conversions=300, hold_seconds=5, databases=_databases("mariadb" if on_mariadb else "sqlite"))


@pytest.mark.pulsar
def test_fault_suite_on_real_pulsar(tmp_path, capsys):
    """The same suite, table and assertions on a real Apache Pulsar 4.0.7 standalone and one MariaDB
    database per service: every service SIGKILLed once and the broker's JVM too (started again by
    `alpes up` on the same data), one service held, poison on every topic (published as the admin
    role, refused by the services as unsigned or undecodable, nacked into each subscription's
    dead-letter topic by the client's DeadLetterPolicy)."""
    data_dir = tmp_path / "alpes"
    try:
        _run(tmp_path, capsys, conversions=int(os.environ.get("ALPES_FAULT_PULSAR_CONVERSIONS", "300")),
             hold_seconds=5, databases=_databases("mariadb"), broker="pulsar")
    finally:  # `alpes up` stops the JVM it ran (the one started again after the kill included)
        left = subprocess.run(["pgrep", "-f", f"PulsarStandaloneStarter.*{data_dir}"], capture_output=True)
    assert left.returncode == 1, f"a Pulsar JVM outlived `alpes up`: {left.stdout!r}"


@pytest.mark.slow
def test_faults_ten_thousand_conversions_every_invariant_holds(tmp_path, capsys):
    _run(tmp_path, capsys, conversions=int(os.environ.get("ALPES_FAULT_CONVERSIONS", "10000")), hold_seconds=30,
         databases=_databases("sqlite"))


def test_alpes_hold_asks_the_running_supervisor_through_a_control_file(tmp_path):
    from typer.testing import CliRunner

    from alpes.cli import app

    runner = CliRunner()
    refused = runner.invoke(app, ["hold", "marketing", "--seconds", "5", "--data-dir", str(tmp_path)])
    assert refused.exit_code == 1 and "no running" in refused.output  # nothing to ask
    (tmp_path / "state.json").write_text("{}")
    assert runner.invoke(app, ["hold", "nadie", "--data-dir", str(tmp_path)]).exit_code != 0
    held = runner.invoke(app, ["hold", "marketing", "--seconds", "5", "--data-dir", str(tmp_path)])
    assert held.exit_code == 0, held.output
    assert float((tmp_path / "control" / "hold-marketing").read_text()) == 5.0


def test_the_table_fails_on_what_the_suites_retries_would_otherwise_hide():
    """The rules of fault_checks on made-up records: a 500 anywhere, a 503 outside a fault window, a
    refund retried for anything but a fault, a valid conversion rejected, and a /sagas that does not
    answer each fail their row; a 503 inside a fault window is counted and passes."""
    import time
    from dataclasses import replace
    from types import SimpleNamespace

    import httpx
    from fault_checks import fault_windows, refund_retry_row, saga_rows, server_error_rows, valid_rejected_row
    from fault_observations import GRACE_SECONDS, Observer

    platform = SimpleNamespace(ports={"conversiones": 18002, "marketing": 18003}, instances={"conversiones": 1,
                                                                                                "marketing": 2})
    observer = Observer(platform)
    now = time.monotonic()
    chaos = [SimpleNamespace(action="kill", target="broker", started_at=now - 100, done_at=now - 90),
             SimpleNamespace(action="poison", target="all topics", started_at=now - 50, done_at=now - 40)]
    windows = fault_windows(chaos, observer)
    assert [w.what for w in windows] == ["kill broker"]  # a poison run is no outage

    # Any client the suite uses gets the hook; this one answers what the test says.
    client = observer.attach(httpx.Client(transport=httpx.MockTransport(
        lambda request: httpx.Response(int(request.headers["x-status"])))))

    def answer(status: int, port: int = 18002, path: str = "/conversiones") -> None:
        client.post(f"http://127.0.0.1:{port}{path}", headers={"x-status": str(status)})

    answer(503)
    observer.incidents[-1] = replace(observer.incidents[-1], at=now - 95)  # as if seen during the kill
    answer(200)  # not recorded
    rows = server_error_rows(observer, windows)
    assert [r.ok for r in rows] == [True, True, True] and rows[0].observed == "1 {'conversiones': 1}"
    answer(503, 18103, "/health")  # marketing-2, outside every window
    answer(500, 18003)
    rows = server_error_rows(observer, windows)
    assert not rows[1].ok and rows[1].observed.startswith("2: 503 marketing-2 POST /health")
    assert "500 marketing POST /conversiones" in rows[1].observed
    observer.no_answer("POST", "http://127.0.0.1:18002/conversiones", time.monotonic())
    assert server_error_rows(observer, windows)[2].observed.startswith("0 / 1: no answer conversiones")
    observer.no_answer("POST", "http://127.0.0.1:18002/conversiones", now - 101)  # in flight when killed
    assert server_error_rows(observer, windows)[2].observed.startswith("1 / 1: no answer conversiones")

    observer.refund_retry("no answer", now - 90 + GRACE_SECONDS / 2)  # inside the kill's grace
    assert refund_retry_row(observer, windows).ok
    observer.refund_retry("no answer", time.monotonic())  # outside every window
    assert not refund_retry_row(observer, windows).ok
    observer.refund_retries.pop()
    observer.refund_retry("409 while detected", now - 95)  # inside, but not a fault's answer
    assert not refund_retry_row(observer, windows).ok

    mine = {"v": SimpleNamespace(kind="valid", held=False), "h": SimpleNamespace(kind="velocity", held=True)}
    view = {"v": {"reason": "commission_not_confirmed"}, "h": {"reason": "rejected_in_review:ip_velocity"}}
    assert valid_rejected_row(mine, {"v": "validated", "h": "rejected"}, view).ok
    row = valid_rejected_row(mine, {"v": "rejected", "h": "rejected"}, view)
    assert not row.ok and row.observed == "1 {'commission_not_confirmed': 1}"

    alert = {"tipo": "saga_atascada", "mensaje": "saga v stuck at commission after 4 requests: ..."}
    snap = {"sagas": {"running": [], "stuck": []}, "alertas": [alert]}
    assert [r.ok for r in saga_rows(snap, {"v": "validated"})] == [True, True, True]
    assert not saga_rows(snap, {"v": "rejected"})[2].ok  # stuck, then compensated: fails
    snap["sagas"]["running"] = "answered 503"
    failed = saga_rows(snap, {"v": "validated"})[0]
    assert not failed.ok and failed.observed == "not known: GET /sagas?estado=running answered 503"
