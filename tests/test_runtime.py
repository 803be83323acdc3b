"""A service's runtime against a broker that goes away and comes back: health tells the truth,
the lifecycle is announced on sistema.eventos, and nothing written meanwhile is lost."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from harness import wait_until
from sqlalchemy import select

from alpes.afiliados import service, tables
from alpes.kernel import embedded_broker
from alpes.settings import Settings


def _outbox(runtime) -> list[dict]:
    with runtime.db.read() as session:
        return [dict(r) for r in session.execute(select(tables.outbox).order_by(tables.outbox.c.id)).mappings()]


def test_broker_outage_is_announced_reported_and_survived(tmp_path: Path):
    broker_dir, port = tmp_path / "broker", embedded_broker.free_port()
    broker = embedded_broker.start_broker_process(broker_dir, port, default_partitions=2)
    app, runtime = service.build(Settings(data_dir=tmp_path, broker_url=f"pulsar://127.0.0.1:{port}"))
    try:
        with TestClient(app) as client:  # runs the lifespan: relay, consumers, watchdog
            wait_until(lambda: client.get("/health").status_code == 200, 30, what="healthy")
            wait_until(lambda: [r for r in _outbox(runtime) if r["event_type"] == "ServicioIniciado" and r["status"] == "sent"],
                       30, what="start announced")

            embedded_broker.stop_process(broker)
            down = wait_until(lambda: (r := client.get("/health")).status_code == 503 and r.json(), 60, what="503")
            assert down["broker"]["ok"] is False and down["database"]["ok"] is True
            # Requests are still accepted: state and events wait in the outbox.
            created = client.post("/afiliados", json={"user_id": "u", "email": "a@example.com", "nombre": "Ana"})
            assert created.status_code == 201
            wait_until(lambda: [r for r in _outbox(runtime) if r["event_type"] == "ServicioDegradado"], 60,
                       what="degraded announced")
            assert client.get("/health").json()["outbox"]["pending"] >= 2
            # A publish the broker never confirmed is recorded as a failed attempt and stays pending.
            failed = wait_until(lambda: [r for r in _outbox(runtime) if r["attempts"] > 0 and r["status"] == "pending"],
                                60, what="a failed publish recorded")
            assert all(r["last_error"] for r in failed)

            broker = embedded_broker.start_broker_process(broker_dir, port, default_partitions=2)
            wait_until(lambda: client.get("/health").status_code == 200, 60, what="healthy again")
            rows = wait_until(lambda: (o := _outbox(runtime)) and all(r["status"] == "sent" for r in o)
                              and any(r["event_type"] == "ServicioRecuperado" for r in o) and o, 60,
                              what="outbox drained after the outage")
            types = [r["event_type"] for r in rows]
            assert types.index("ServicioDegradado") < types.index("ServicioRecuperado")
            assert {"AfiliadoRegistrado", "AfiliadoValidado"} <= set(types)
            assert {r["event_id"] for r in failed} <= {r["event_id"] for r in rows if r["status"] == "sent"}
    finally:
        embedded_broker.stop_process(broker)
