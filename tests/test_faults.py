"""Fault injection through the running platform: a mixed load of conversions (valid, duplicate,
fraudulent, refunded) while every process is SIGKILLed once, one service is held down, and a
poison message lands on every topic; then every invariant is checked and printed as a table.

The default run is small; the slow one (`make test-slow`, CI) sends 10,000 conversions. The long
one runs alone with a chosen size and seed:

    ALPES_FAULT_CONVERSIONS=20000 ALPES_FAULT_SEED=7 .venv/bin/pytest tests/test_faults.py -m slow -s
"""

from __future__ import annotations

import os
import random

import pytest
from faultsuite import console_printer, run_fault_suite


def _seed() -> int:
    seed = os.environ.get("ALPES_FAULT_SEED")
    return int(seed) if seed else random.SystemRandom().randint(1, 10**6)


def _run(tmp_path, capsys, conversions: int, hold_seconds: float) -> None:
    with capsys.disabled():  # the table belongs in the test's output, with or without -s
        print()
        rows = run_fault_suite(tmp_path / "alpes", conversions=conversions, seed=_seed(), hold_seconds=hold_seconds,
                               hold_service=os.environ.get("ALPES_FAULT_HOLD_SERVICE") or None,
                               out=console_printer())
    failed = [f"{r.check}: expected {r.expected}, observed {r.observed}" for r in rows if not r.ok]
    assert rows and not failed, "\n".join(failed)


def test_faults_small_load_every_invariant_holds(tmp_path, capsys):
    _run(tmp_path, capsys, conversions=300, hold_seconds=5)


@pytest.mark.slow
def test_faults_ten_thousand_conversions_every_invariant_holds(tmp_path, capsys):
    _run(tmp_path, capsys, conversions=int(os.environ.get("ALPES_FAULT_CONVERSIONS", "10000")), hold_seconds=30)


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
