"""`alpes up`: the embedded broker and the four services as separate OS processes.

Restarts a process that dies (with backoff), keeps all state in the data directory, and on
Ctrl-C (SIGINT) or SIGTERM stops the services first, then the broker. `alpes hold <service>
--seconds N` (a control file in the data directory) stops one service cleanly and keeps it
down for N seconds, then starts it again: an outage, not a crash.
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
from .kernel.backlog import stalled_partitions
from .settings import Settings

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
    service: str = ""  # a service instance: its service, index and HTTP port ("" for the broker)
    index: int = 0
    port: int = 0
    cleared_for_pid: int | None = None  # the exit the embedded broker was already restarted for
    process: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    history: list[float] = field(default_factory=list)
    held_for: float | None = None  # stopped on purpose (`alpes hold`) for this many seconds ...
    held_until: float | None = None  # ... counted from its exit (monotonic)

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
        self.metrics_url: str | None = None
        self.broker_watchdog_restarts = 0
        self.broker_stall_restarts = 0
        # Set by the watchdog thread, acted on by _watch: (pid, wedged, what it saw) of a broker that
        # stopped answering lookups (wedged) or holds messages it hands to nobody.
        self._broker_flagged: tuple[int, bool, str] | None = None
        self._stall_streak = 0  # stall restarts with no clean check between: each waits twice as long
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
            broker_url = self._start_broker()
            for name in self.services:
                # Instance 0 keeps the service's name and port; instance i > 0 is "<service>-<i+1>"
                # on port + 100 * i, the same database and subscriptions (see README "Scaling").
                for index in range(self.settings.instances(name)):
                    child = self._service_child(name, index, broker_url)
                    self.children[child.name] = child
                    child.start()
            self._wait_healthy()
            self._print_endpoints(broker_url)
            self._write_state(broker_url)
            if self.broker is not None:
                threading.Thread(target=self._watch_broker_answers, name="broker-watchdog", daemon=True).start()
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
        # Its Prometheus metrics on loopback only: services read each subscription's backlog there.
        metrics_port = s.broker_metrics_port or embedded_broker.listen_port()
        embedded_broker.write_config(config, 1, metrics_addr=f"127.0.0.1:{metrics_port}")
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
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

    def _service_child(self, name: str, index: int, broker_url: str) -> Child:
        env = dict(os.environ)
        port = self.settings.instance_port(name, index)
        env.update({"ALPES_DATA_DIR": str(self.data_dir), "ALPES_BROKER_URL": broker_url,
                    "PYTHONUNBUFFERED": "1", f"ALPES_{name.upper()}_PORT": str(port),
                    f"ALPES_{name.upper()}_INSTANCES": str(self.settings.instances(name)),
                    "ALPES_INSTANCE_INDEX": str(index)})
        if self.broker is not None:
            env["ALPES_BROKER_EMBEDDED"] = "1"
        if self.metrics_url:
            env["ALPES_PULSAR_METRICS_URL"] = self.metrics_url
        child_name = name if index == 0 else f"{name}-{index + 1}"
        return Child(child_name, [sys.executable, "-m", "alpes", "service", name], env,
                     self.data_dir / "logs" / f"{child_name}.log", service=name, index=index, port=port)

    def _health_url(self, name: str) -> str:
        return f"http://{self.settings.host}:{self.children[name].port}/health"

    def _wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(self.children)
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
            url = f"http://{self.settings.host}:{child.port}"
            table.add_row(name, f"{url}  (docs: {url}/docs)", str(child.process.pid if child.process else "-"))
        self.console.print(table)
        self.console.print("Ctrl-C stops everything.")

    def _write_state(self, broker_url: str) -> None:
        state = {"broker_url": broker_url, "supervisor_pid": os.getpid(),
                 "broker_pid": self.broker.process.pid if self.broker and self.broker.process else None,
                 "broker_watchdog_restarts": self.broker_watchdog_restarts,
                 "broker_stall_restarts": self.broker_stall_restarts,
                 "services": {n: {"url": f"http://{self.settings.host}:{c.port}", "service": c.service,
                                  "instance": c.index,
                                  "pid": c.process.pid if c.process else None, "restarts": c.restarts}
                              for n, c in self.children.items()}}
        tmp = self.data_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        tmp.replace(self.data_dir / "state.json")

    # -- watch and restart -------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(0.3):
            if self._rebalance_after_exit() or self._restart_flagged_broker():
                self._write_state(f"pulsar://127.0.0.1:{self.settings.broker_port}")
            changed = self._apply_holds()
            for child in ([self.broker] if self.broker else []) + list(self.children.values()):
                if child.alive() or child.held_for is not None:
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
                    child.next_start = 0.0
                    child.restarts += 1
                    child.start()
                    if child is self.broker:
                        embedded_broker.wait_until_listening(self.settings.broker_port, child.process)
                    changed = True
            if changed:
                self._write_state(self.settings.resolved_broker_url() if not self.broker
                                  else f"pulsar://127.0.0.1:{self.settings.broker_port}")

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

    def _rebalance_after_exit(self) -> bool:
        """A service process has exited: restart the embedded broker at once when the consumers it
        had may keep messages from the others. Measured on pulsar-lite 0.2.0:
        - Key_Shared (tools/measure_subscriptions.py, tools/measure_acks.py): a consumer that
          leaves, even by a clean close, strands the messages it was handed until the broker
          restarts, for the other instances and for its own successor alike.
        - Failover: the consumers of a connection that died without closing them (a crash) stay
          registered, collide with the restarted service's consumer ids and, as the active
          consumer, hold their partitions' messages forever.
        Its dispatch state and consumer registry live in memory only; messages are durable and
        every client reconnects by itself. Apache Pulsar needs none of this."""
        if self.broker is None or self.broker.process is None:
            return False
        for child in self.children.values():
            if child.alive() or child.process is None or child.cleared_for_pid == child.process.pid:
                continue
            code = child.process.returncode
            # uvicorn re-raises SIGTERM after its graceful shutdown: -15 is a clean stop of a held service.
            crashed = code != 0 and not (child.held_for is not None and code == -signal.SIGTERM)
            if self.settings.subscription_type != "key_shared" and not crashed:
                continue
            child.cleared_for_pid = child.process.pid
            self.console.print(f"[yellow]{child.name} left (code {code}): restarting the embedded broker so "
                               "no message handed to its consumers stays stranded[/]")
            self._restart_broker()
            return True
        return False

    WATCHDOG_MISSES = 3  # probes in a row (each waits up to 10 s) before the broker counts as wedged

    def _watch_broker_answers(self) -> None:
        """Liveness probe of the embedded broker, as an orchestrator would run one. Measured on
        pulsar-lite 0.2.0 in the 10,000-conversion fault run: its Key_Shared dispatcher can spin
        in `pop_dispatchable_redelivery_message` (re-reading one entry from disk without end),
        which starves its runtime: the process lives, connections stay open, and lookups and
        producer creation time out for every client, new ones included. A restart clears it
        (its dispatch state is in memory; messages and cursors are durable)."""
        topic = f"persistent://{self.settings.pulsar_tenant}/{self.settings.pulsar_namespace}/sistema.eventos"
        url = f"pulsar://127.0.0.1:{self.settings.broker_port}"
        misses, pid = 0, None
        while not self._stop.wait(self.settings.broker_watchdog_seconds):
            broker = self.broker
            if broker is None or not broker.alive() or broker.process is None:
                misses = 0
                continue
            if broker.process.pid != pid:
                misses, pid = 0, broker.process.pid
            if embedded_broker.answers_lookups(url, topic):
                misses = 0
                self._check_dispatch(broker)
                continue
            misses += 1
            if misses >= self.WATCHDOG_MISSES and broker.process.pid == pid:
                self._broker_flagged = (pid, True, f"has not answered a lookup for {self.WATCHDOG_MISSES} probes in a row")
                misses = 0

    def _check_dispatch(self, broker: Child) -> None:
        """Second probe, for a broker that answers but stopped handing out messages. Measured on
        pulsar-lite 0.2.0 in the 10,000-conversion fault run, after a restart under load: clients
        re-subscribing collide with their own consumers of a dropped connection ("Consumer N
        already exists in key-shared dispatcher"), the broker drops the connection again, and a
        subscription keeps thousands of messages with no consumer; or a consumer stays registered
        and is handed nothing. Either way backlog > 0, nothing unacknowledged and nothing
        dispatched for `broker_stall_seconds`, while every instance of the subscribing service
        runs. A restart cleared both (seen twice). Only the services' own subscriptions count,
        and only once the broker and those services have run that long."""
        stall = self.settings.broker_stall_seconds
        now = time.monotonic()
        # A stall a restart does not cure must not turn into a restart a minute: back off.
        if self.metrics_url is None or now - broker.started_at < stall * 2 ** min(self._stall_streak, 4):
            return
        serving = {c.service for c in self.children.values()}
        for child in self.children.values():
            if not child.alive() or child.held_for is not None or now - child.started_at < stall:
                serving.discard(child.service)
        watched = [(x.topic, x.name) for x in SUBSCRIPTIONS if x.service in serving]
        try:
            text = httpx.get(self.metrics_url, timeout=5).text
        except httpx.HTTPError:
            return  # the lookup probe judges a broker that does not answer
        stalled = stalled_partitions(text, f"{self.settings.pulsar_tenant}/{self.settings.pulsar_namespace}",
                                     watched, time.time(), stall)
        if not stalled:
            self._stall_streak = 0
        elif broker.process is not None:
            shown = ", ".join(stalled[:4]) + (f" and {len(stalled) - 4} more" if len(stalled) > 4 else "")
            self._broker_flagged = (broker.process.pid, False, f"has handed nothing out for {stall:.0f}s on {shown}")

    def _restart_flagged_broker(self) -> bool:
        """Restart the broker the watchdog thread flagged, unless it was restarted meanwhile."""
        flagged, self._broker_flagged = self._broker_flagged, None
        if flagged is None or self.broker is None or self.broker.process is None:
            return False
        pid, wedged, seen = flagged
        if self.broker.process.pid != pid or not self.broker.alive():
            return False
        self.console.print(f"[yellow]the embedded broker {seen}: restarting it[/]")
        if wedged:
            self.broker_watchdog_restarts += 1
        else:
            self.broker_stall_restarts += 1
            self._stall_streak += 1
        self._restart_broker(kill=wedged)  # a wedged one may not get to a clean stop: its runtime is starved
        return True

    def _restart_broker(self, kill: bool = False) -> None:
        """Stop the embedded broker (SIGTERM, or SIGKILL with `kill`) and start it on its port again."""
        assert self.broker is not None and self.broker.process is not None
        if kill:
            self.broker.process.kill()
            self.broker.process.wait()
        else:
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
