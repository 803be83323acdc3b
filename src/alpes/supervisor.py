"""`alpes up`: the broker, the four services and the web console as separate OS processes.

Restarts a process that dies (with backoff), keeps all state in the data directory, and on
Ctrl-C (SIGINT) or SIGTERM stops the services first, then the broker. `alpes hold <service>
--seconds N` (a control file in the data directory) stops one service cleanly and keeps it
down for N seconds, then starts it again: an outage, not a crash. With no ALPES_BROKER_URL it
runs the embedded broker, and everything done for it goes through `self.embedded`
(supervisor_embedded.py); with `--broker pulsar` it runs a real Apache Pulsar standalone instead
(supervisor_pulsar.py: `self.pulsar`); with a URL, both are None and the services get the URL.
`self.local_broker` is whichever of the two it runs. The console (`consola`, port 8000) is started
after the services and restarted like them, but kept out of `self.children` (the service instances):
it has no consumers, so its exits are nothing the broker needs to hear of.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from .child_process import Child
from .contract import SERVICES
from .settings import Settings
from .supervisor_embedded import EmbeddedBrokerSupervision
from .supervisor_pulsar import PulsarStandaloneSupervision

HOLD_DIR = "control"


def hold_service(data_dir: Path, service: str, seconds: float) -> None:
    """Ask the supervisor running on `data_dir` to stop `service` and keep it down for `seconds`
    counted from when its process has exited. A file, not a signal: it names the service and
    the duration, and waits for the next tick of a busy watcher."""
    folder = Path(data_dir) / HOLD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"hold-{service}.tmp"
    tmp.write_text(str(float(seconds)), encoding="utf-8")
    tmp.replace(folder / f"hold-{service}")


class Supervisor:
    def __init__(self, settings: Settings, services: list[str] | None = None, console: Console | None = None,
                 broker: str = "embedded") -> None:
        """`broker`: "embedded" (pulsar-lite, or the cluster ALPES_BROKER_URL names) or "pulsar" (a
        real Apache Pulsar standalone run here)."""
        if broker not in ("embedded", "pulsar"):
            raise ValueError(f"broker must be embedded or pulsar, not {broker!r}")
        if broker == "pulsar" and settings.broker_url:
            raise SystemExit("--broker pulsar runs its own Apache Pulsar: unset ALPES_BROKER_URL "
                             "(or keep it and drop --broker to use that cluster)")
        self.settings = settings
        self.services = services or list(SERVICES)
        self.console = console or Console()
        self.data_dir = settings.data_dir.resolve()
        self.children: dict[str, Child] = {}
        self.console_child: Child | None = None
        # The one seam to the embedded broker: None on Apache Pulsar.
        self.embedded = (EmbeddedBrokerSupervision(settings, self.data_dir, self.console, self.children)
                         if settings.embedded_broker and broker == "embedded" else None)
        self.pulsar = PulsarStandaloneSupervision(settings, self.data_dir, self.console) if broker == "pulsar" else None
        self.local_broker = self.embedded or self.pulsar
        self.broker_url = settings.resolved_broker_url()
        self._stop = threading.Event()
        self._lock_file = None

    # -- start -------------------------------------------------------------------------
    def run(self) -> int:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        for stale in (self.data_dir / HOLD_DIR).glob("hold-*"):  # a hold is for the supervisor that saw it
            stale.unlink()
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            if self.local_broker is not None:
                self.broker_url = self.local_broker.start()
            for name in self.services:
                # Instance 0 keeps the service's name and port; instance i > 0 is "<service>-<i+1>"
                # on port + 100 * i, the same database and subscriptions (see README "Scaling").
                for index in range(self.settings.instances(name)):
                    child = self._service_child(name, index)
                    self.children[child.name] = child
                    child.start()
            self.console_child = self._console_child()
            self.console_child.start()
            self._wait_healthy()
            self._print_endpoints()
            self._write_state()
            if self.embedded is not None:
                self.embedded.start_watchdog(self._stop)
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

    def _service_child(self, name: str, index: int) -> Child:
        env = dict(os.environ)
        port = self.settings.instance_port(name, index)
        env.update({"ALPES_DATA_DIR": str(self.data_dir), "PYTHONUNBUFFERED": "1",
                    f"ALPES_{name.upper()}_PORT": str(port),
                    f"ALPES_{name.upper()}_INSTANCES": str(self.settings.instances(name)),
                    "ALPES_INSTANCE_INDEX": str(index)})
        if self.local_broker is not None:
            for key in ("ALPES_BROKER_URL", "ALPES_PULSAR_TOKEN"):  # a cluster's, from the shell
                env.pop(key, None)
            env.update(self.local_broker.service_env(name))
        else:
            env["ALPES_BROKER_URL"] = self.broker_url
        child_name = name if index == 0 else f"{name}-{index + 1}"
        return Child(child_name, [sys.executable, "-m", "alpes", "service", name], env,
                     self.data_dir / "logs" / f"{child_name}.log", service=name, index=index, port=port)

    def _console_child(self) -> Child:
        """The web console: where each service instance listens (for its health page) and its own port."""
        env = dict(os.environ)
        env.update({"ALPES_DATA_DIR": str(self.data_dir), "PYTHONUNBUFFERED": "1",
                    "ALPES_CONSOLA_PORT": str(self.settings.consola_port)})
        for name in SERVICES:
            env[f"ALPES_{name.upper()}_PORT"] = str(self.settings.port(name))
            env[f"ALPES_{name.upper()}_INSTANCES"] = str(self.settings.instances(name))
        return Child("consola", [sys.executable, "-m", "alpes", "consola"], env, self.data_dir / "logs" / "consola.log",
                     service="consola", port=self.settings.consola_port)

    def _all_children(self) -> list[Child]:
        return [*self.children.values(), *([self.console_child] if self.console_child else [])]

    def _health_url(self, name: str) -> str:
        child = self.console_child if name == "consola" else self.children[name]
        return f"http://{self.settings.host}:{child.port}/health"

    def _wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        by_name = {child.name: child for child in self._all_children()}
        waiting = set(by_name)
        while waiting and time.monotonic() < deadline and not self._stop.is_set():
            for name in list(waiting):
                child = by_name[name]
                if not child.alive():
                    tail = "\n".join(child.log_path.read_text(errors="replace").splitlines()[-10:])
                    raise SystemExit(f"{name} exited during start-up; {child.log_path} ends:\n{tail}")
                try:
                    if httpx.get(self._health_url(name), timeout=1).status_code == 200:
                        waiting.discard(name)
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        if waiting and not self._stop.is_set():
            raise SystemExit(f"not healthy after {timeout}s: {sorted(waiting)}; logs in {self.data_dir / 'logs'}")

    def _print_endpoints(self) -> None:
        table = Table(title=f"AlpesPartner is up (data: {self.data_dir})")
        table.add_column("component")
        table.add_column("listens on")
        table.add_column("pid")
        broker_pid = self.local_broker.pid() if self.local_broker is not None else None
        label = self.local_broker.label if self.local_broker is not None else "broker (Apache Pulsar, ALPES_BROKER_URL)"
        table.add_row(label, self.broker_url, str(broker_pid) if broker_pid else "-")
        for row in self.pulsar.table_rows() if self.pulsar is not None else []:
            table.add_row(*row)
        for name, child in self.children.items():
            url = f"http://{self.settings.host}:{child.port}"
            table.add_row(name, f"{url}  (docs: {url}/docs)", str(child.process.pid if child.process else "-"))
        if self.console_child is not None:
            pid = self.console_child.process.pid if self.console_child.process else "-"
            table.add_row("consola (web console)", f"http://{self.settings.host}:{self.console_child.port}/", str(pid))
        table.add_row("access", self._access_mode(), "-")
        self.console.print(table)
        if self._anonymous_is_operator():
            self.console.print("[bold red]PROTECTED LOCAL MODE:[/] no API key exists yet, so anonymous requests from "
                               "this machine act as the OPERATOR. Create the first key with "
                               "`alpes keys create --role operator`; ALPES_AUTH=required closes this mode.")
        self.console.print("Ctrl-C stops everything.")

    def _anonymous_is_operator(self) -> bool:
        """As marketing's /health says (it issues the keys; the others learn them moments later)."""
        name = next((n for n, c in self.children.items() if c.service == "marketing"), None)
        if name is None:
            return False
        try:
            access = httpx.get(self._health_url(name), timeout=2).json().get("access", {})
        except (httpx.HTTPError, ValueError):
            return False
        return bool(access.get("anonymous_is_operator"))

    def _access_mode(self) -> str:
        if not self.settings.protected_local_mode:
            return "API key required (Authorization: Bearer <key>)"
        if self._anonymous_is_operator():
            return "PROTECTED LOCAL MODE: anonymous = operator until the first key"
        return "API key required (keys exist; loopback only)"

    def _write_state(self) -> None:
        broker = (self.local_broker.state() if self.local_broker is not None
                  else {"broker_pid": None, "broker_watchdog_restarts": 0, "broker_stall_restarts": 0})
        state = {"broker_url": self.broker_url, "supervisor_pid": os.getpid(), **broker,
                 "services": {n: {"url": f"http://{self.settings.host}:{c.port}", "service": c.service,
                                  "instance": c.index,
                                  "pid": c.process.pid if c.process else None, "restarts": c.restarts}
                              for n, c in self.children.items()}}
        if self.console_child is not None:
            c = self.console_child
            state["consola"] = {"url": f"http://{self.settings.host}:{c.port}",
                                "pid": c.process.pid if c.process else None, "restarts": c.restarts}
        tmp = self.data_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        tmp.replace(self.data_dir / "state.json")

    # -- watch and restart -------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(0.3):
            # Before the services' restarts: the embedded broker's repairs look at processes that exited.
            if self.local_broker is not None and self.local_broker.repair():
                self._write_state()
            changed = self._apply_holds()
            for child in self._all_children():
                if child.alive() or child.held_for is not None:
                    continue
                if child.restart_due(self.console):
                    child.start()
                    changed = True
            if changed:
                self._write_state()

    def _apply_holds(self) -> bool:
        """Stop a service named by a hold file and keep it down for the time the file says; True
        when a held service stopped or was started again."""
        changed = False
        folder = self.data_dir / HOLD_DIR
        for name, child in self.children.items():
            path = folder / f"hold-{name}"
            if child.held_for is None and path.exists():
                try:
                    child.held_for = float(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue  # being written: next tick
                self.console.print(f"[yellow]{name}: stopping it, held down for {child.held_for:.0f}s[/]")
                # SIGTERM: it closes its consumers, so the broker keeps its messages for its return.
                threading.Thread(target=child.stop, daemon=True).start()
            if child.held_for is None or child.alive():
                continue
            now = time.monotonic()
            if child.held_until is None:
                child.held_until = now + child.held_for
                changed = True
            elif now >= child.held_until:
                path.unlink(missing_ok=True)
                child.held_for = child.held_until = None
                child.next_start = 0.0
                child.restarts += 1
                child.start()
                self.console.print(f"[green]{name}: hold over, started again[/]")
                changed = True
        return changed

    def shutdown(self) -> None:
        for child in self._all_children():
            threading.Thread(target=child.stop, daemon=True).start()
        deadline = time.monotonic() + 25
        while any(c.alive() for c in self._all_children()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in self._all_children():
            if child.alive() and child.process:
                child.process.kill()
        if self.local_broker is not None:
            self.local_broker.stop()
        state = self.data_dir / "state.json"
        if state.exists():
            state.unlink()
        self.console.print("AlpesPartner stopped.")
