"""`alpes up`: the embedded broker and the four services as separate OS processes.

Restarts a process that dies (with backoff), keeps all state in the data directory, and on
Ctrl-C (SIGINT) or SIGTERM stops the services first, then the broker.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from .contract import SERVICES, SUBSCRIPTIONS, TOPICS
from .kernel import embedded_broker
from .settings import Settings


def _terminate_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies (even by SIGKILL), so no
    orphan keeps the ports and the data directory busy. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    history: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_terminate_with_parent)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Supervisor:
    def __init__(self, settings: Settings, services: list[str] | None = None, console: Console | None = None) -> None:
        self.settings = settings
        self.services = services or list(SERVICES)
        self.console = console or Console()
        self.data_dir = settings.data_dir.resolve()
        self.broker: Child | None = None
        self.children: dict[str, Child] = {}
        self._stop = threading.Event()
        self._lock_file = None

    # -- start -------------------------------------------------------------------------
    def run(self) -> int:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            broker_url = self._start_broker()
            for name in self.services:
                self.children[name] = self._service_child(name, broker_url)
                self.children[name].start()
            self._wait_healthy()
            self._print_endpoints(broker_url)
            self._write_state(broker_url)
            self._watch()
        finally:
            self.shutdown()
        return 0

    def _take_lock(self) -> None:
        self._lock_file = open(self.data_dir / "alpes.lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another `alpes up` is running on {self.data_dir}") from None

    def _start_broker(self) -> str:
        s = self.settings
        if not s.embedded_broker:
            return s.resolved_broker_url()
        broker_dir = self.data_dir / "broker"
        if embedded_broker.provision_embedded(broker_dir, TOPICS, [(x.topic, x.name) for x in SUBSCRIPTIONS],
                                              s.pulsar_tenant, s.pulsar_namespace):
            self.console.print(f"provisioned {len(TOPICS)} topics and {len(SUBSCRIPTIONS)} subscriptions")
        config = broker_dir / "pulsar-lite-1.toml"
        embedded_broker.write_config(config, 1)
        self.broker = Child("broker", [embedded_broker.broker_binary(), "--config", str(config),
                                       "--addr", f"127.0.0.1:{s.broker_port}", "--db-path", str(broker_dir / "store"),
                                       "--log-level", "warn"],
                            dict(os.environ), self.data_dir / "logs" / "broker.log")
        self.broker.start()
        embedded_broker.wait_until_listening(s.broker_port, self.broker.process)
        url = f"pulsar://127.0.0.1:{s.broker_port}"
        counts = embedded_broker.verify_partitions(url, TOPICS, s.pulsar_tenant, s.pulsar_namespace)
        wrong = {t: (n, TOPICS[t]) for t, n in counts.items() if n != TOPICS[t]}
        if wrong:
            raise SystemExit(f"broker partitions differ from the contract: {wrong}")
        return url

    def _service_child(self, name: str, broker_url: str) -> Child:
        env = dict(os.environ)
        env.update({"ALPES_DATA_DIR": str(self.data_dir), "ALPES_BROKER_URL": broker_url,
                    "PYTHONUNBUFFERED": "1"})
        return Child(name, [sys.executable, "-m", "alpes", "service", name], env, self.data_dir / "logs" / f"{name}.log")

    def _health_url(self, name: str) -> str:
        return f"http://{self.settings.host}:{self.settings.port(name)}/health"

    def _wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(self.services)
        while waiting and time.monotonic() < deadline and not self._stop.is_set():
            for name in list(waiting):
                child = self.children[name]
                if not child.alive():
                    raise SystemExit(f"{name} exited during start-up; see {child.log_path}")
                try:
                    if httpx.get(self._health_url(name), timeout=1).status_code == 200:
                        waiting.discard(name)
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        if waiting and not self._stop.is_set():
            raise SystemExit(f"not healthy after {timeout}s: {sorted(waiting)}; logs in {self.data_dir / 'logs'}")

    def _print_endpoints(self, broker_url: str) -> None:
        table = Table(title=f"AlpesPartner is up (data: {self.data_dir})")
        table.add_column("component")
        table.add_column("listens on")
        table.add_column("pid")
        table.add_row("broker" + (" (embedded pulsar-lite)" if self.broker else ""), broker_url,
                      str(self.broker.process.pid) if self.broker and self.broker.process else "-")
        for name, child in self.children.items():
            url = f"http://{self.settings.host}:{self.settings.port(name)}"
            table.add_row(name, f"{url}  (docs: {url}/docs)", str(child.process.pid if child.process else "-"))
        self.console.print(table)
        self.console.print("Ctrl-C stops everything.")

    def _write_state(self, broker_url: str) -> None:
        state = {"broker_url": broker_url, "supervisor_pid": os.getpid(),
                 "broker_pid": self.broker.process.pid if self.broker and self.broker.process else None,
                 "services": {n: {"url": f"http://{self.settings.host}:{self.settings.port(n)}",
                                  "pid": c.process.pid if c.process else None, "restarts": c.restarts}
                              for n, c in self.children.items()}}
        tmp = self.data_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        tmp.replace(self.data_dir / "state.json")

    # -- watch and restart -------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(0.3):
            changed = False
            for child in ([self.broker] if self.broker else []) + list(self.children.values()):
                if child.alive():
                    continue
                now = time.monotonic()
                if child.next_start == 0.0:
                    code = child.process.returncode if child.process else None
                    # Back off when a process keeps dying at once, not when it ran for a while.
                    quick = now - child.started_at < 10
                    delay = min(10.0, 0.5 * (2 ** min(child.restarts, 5))) if quick else 0.2
                    child.next_start = now + delay
                    self.console.print(f"[yellow]{child.name} exited (code {code}); restarting in {delay:.1f}s[/]")
                if now >= child.next_start:
                    if child is not self.broker and self.broker and child.process and child.process.returncode != 0:
                        self._clear_dead_consumers(child.name)
                    child.next_start = 0.0
                    child.restarts += 1
                    child.start()
                    if child is self.broker:
                        embedded_broker.wait_until_listening(self.settings.broker_port, child.process)
                    changed = True
            if changed:
                self._write_state(self.settings.resolved_broker_url() if not self.broker
                                  else f"pulsar://127.0.0.1:{self.settings.broker_port}")

    def _clear_dead_consumers(self, service: str) -> None:
        """pulsar-lite 0.2.0 keeps the consumers of a connection that died without closing them
        (a crashed service): they stay registered, collide with the restarted service's consumer
        ids and, as the active Failover consumer, hold their partitions' messages forever. Its
        registry lives in memory only, so a restart of the embedded broker clears them; messages
        are durable and every client reconnects by itself. A real Pulsar cluster needs none of this."""
        assert self.broker is not None and self.broker.process is not None
        self.console.print(f"[yellow]{service} died without closing its consumers: restarting the embedded broker[/]")
        self.broker.stop()
        self.broker.restarts += 1
        self.broker.start()
        embedded_broker.wait_until_listening(self.settings.broker_port, self.broker.process)

    def shutdown(self) -> None:
        for child in self.children.values():
            threading.Thread(target=child.stop, daemon=True).start()
        deadline = time.monotonic() + 25
        while any(c.alive() for c in self.children.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in self.children.values():
            if child.alive() and child.process:
                child.process.kill()
        if self.broker:
            self.broker.stop()
        state = self.data_dir / "state.json"
        if state.exists():
            state.unlink()
        self.console.print("AlpesPartner stopped.")
