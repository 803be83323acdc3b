"""`alpes up`'s side of the embedded broker (pulsar-lite): running it, and repairing it.

Exists only because of pulsar-lite. The supervisor builds it only when the settings name no
broker URL, so on Apache Pulsar none of it runs. Every repair is a restart of the broker, which
loses nothing: its dispatch state and consumer registry live in memory, messages and cursors are
durable, and clients reconnect by themselves. When it restarts, and why (each a row of the
README's "The embedded broker" table):

- a service process exited: a Key_Shared consumer that leaves, even by a clean close, strands
  the messages it was handed, for the other instances and for its own successor alike; and the
  consumers of a connection that died without closing them stay registered and, on Failover,
  hold their partitions. So at once, for any exit on Key_Shared and for a crash on Failover.
- it does not answer lookups: its Key_Shared dispatcher can spin and starve its runtime (the
  process lives, connections stay open, lookups and producer creation time out for every
  client). A watchdog asks for a lookup through a fresh client every `broker_watchdog_seconds`;
  after WATCHDOG_MISSES misses in a row it kills the broker and starts it again.
- it hands a subscription's messages to nobody: after a restart under load, consumers that
  re-subscribe may collide with their own consumers of a dropped connection, or one stays
  registered and is handed nothing. When a running service's subscription has backlog, nothing
  unacknowledged and nothing dispatched for `broker_stall_seconds` (its Prometheus gauges), it
  restarts it; a further restart in a row waits twice as long, up to 16 times.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console

from .child_process import Child
from .contract import SUBSCRIPTIONS, TOPICS
from .kernel import embedded_broker
from .kernel.ports import listen_port
from .settings import Settings


class EmbeddedBrokerSupervision:
    WATCHDOG_MISSES = 3  # probes in a row (each waits up to 10 s) before the broker counts as wedged
    label = "broker (embedded pulsar-lite)"  # its row in `alpes up`'s start-up table

    def __init__(self, settings: Settings, data_dir: Path, console: Console, children: dict[str, Child]) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.console = console
        self.children = children  # the supervisor's service instances, by name
        self.port = settings.broker_port
        self.url = f"pulsar://127.0.0.1:{settings.broker_port}"
        self.broker: Child | None = None
        self.metrics_port = 0
        self.metrics_url: str | None = None
        self.watchdog_restarts = 0
        self.stall_restarts = 0
        # Set by the watchdog thread, acted on by repair(): (pid, wedged, what it saw) of a broker that
        # stopped answering lookups (wedged) or holds messages it hands to nobody.
        self._flagged: tuple[int, bool, str] | None = None
        self._stall_streak = 0  # stall restarts with no clean check between: each waits twice as long

    # -- run it ------------------------------------------------------------------------------
    def start(self) -> str:
        """Provision (once per data directory), start the broker, check its partition counts; its URL."""
        s = self.settings
        broker_dir = self.data_dir / "broker"
        if embedded_broker.provision_embedded(broker_dir, TOPICS, [(x.topic, x.name) for x in SUBSCRIPTIONS],
                                              s.pulsar_tenant, s.pulsar_namespace):
            self.console.print(f"provisioned {len(TOPICS)} topics and {len(SUBSCRIPTIONS)} subscriptions")
        config = broker_dir / "pulsar-lite-1.toml"
        # Its Prometheus metrics on loopback only: services read each subscription's backlog there.
        self.metrics_port = s.broker_metrics_port or listen_port()
        embedded_broker.write_config(config, 1, metrics_addr=f"127.0.0.1:{self.metrics_port}")
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.broker = Child("broker", embedded_broker.broker_command(config, self.port, broker_dir / "store"),
                            dict(os.environ), self.data_dir / "logs" / "broker.log")
        self._start_process()
        counts = embedded_broker.verify_partitions(self.url, TOPICS, s.pulsar_tenant, s.pulsar_namespace)
        wrong = {t: (n, TOPICS[t]) for t, n in counts.items() if n != TOPICS[t]}
        if wrong:
            raise SystemExit(f"broker partitions differ from the contract: {wrong}")
        return self.url

    def service_env(self, service: str) -> dict[str, str]:
        """What a service (any: `service` is not needed here) needs to find it (with
        ALPES_BROKER_URL unset: settings.embedded_broker)."""
        return {"ALPES_BROKER_PORT": str(self.port), "ALPES_BROKER_METRICS_PORT": str(self.metrics_port)}

    def start_watchdog(self, stop: threading.Event) -> None:
        threading.Thread(target=self._watch_answers, args=(stop,), name="broker-watchdog", daemon=True).start()

    def pid(self) -> int | None:
        return self.broker.process.pid if self.broker and self.broker.process else None

    def state(self) -> dict:
        return {"broker_pid": self.pid(), "broker_watchdog_restarts": self.watchdog_restarts,
                "broker_stall_restarts": self.stall_restarts}

    def stop(self) -> None:
        if self.broker:
            self.broker.stop()

    def _start_process(self) -> None:
        assert self.broker is not None
        self.broker.start()
        embedded_broker.wait_until_listening(self.port, self.broker.process)

    def _restart(self, kill: bool = False) -> None:
        """Stop the broker (SIGTERM, or SIGKILL with `kill`) and start it on its port again."""
        assert self.broker is not None and self.broker.process is not None
        if kill:
            self.broker.process.kill()
            self.broker.process.wait()
        else:
            self.broker.stop()
        self.broker.restarts += 1
        self._start_process()

    # -- repair it (called from the supervisor's watch loop) -------------------------------------
    def repair(self) -> bool:
        """Restart the broker when it exited, when a service exited, or when the watchdog flagged
        it; True when it was restarted."""
        return self._restart_after_service_exit() or self.restart_flagged() or self._restart_if_exited()

    def _restart_if_exited(self) -> bool:
        if self.broker is None or self.broker.alive() or not self.broker.restart_due(self.console):
            return False
        self._start_process()
        return True

    def _restart_after_service_exit(self) -> bool:
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
            self._restart()
            return True
        return False

    def restart_flagged(self) -> bool:
        """Restart the broker the watchdog thread flagged, unless it was restarted meanwhile."""
        flagged, self._flagged = self._flagged, None
        if flagged is None or self.broker is None or self.broker.process is None:
            return False
        pid, wedged, seen = flagged
        if self.broker.process.pid != pid or not self.broker.alive():
            return False
        self.console.print(f"[yellow]the embedded broker {seen}: restarting it[/]")
        if wedged:
            self.watchdog_restarts += 1
        else:
            self.stall_restarts += 1
            self._stall_streak += 1
        self._restart(kill=wedged)  # a wedged one may not get to a clean stop: its runtime is starved
        return True

    # -- the watchdog thread ---------------------------------------------------------------------
    def _watch_answers(self, stop: threading.Event) -> None:
        """Ask for a lookup through a fresh client; a broker that answers gets the dispatch check."""
        topic = f"persistent://{self.settings.pulsar_tenant}/{self.settings.pulsar_namespace}/sistema.eventos"
        misses, pid = 0, None
        while not stop.wait(self.settings.broker_watchdog_seconds):
            broker = self.broker
            if broker is None or not broker.alive() or broker.process is None:
                misses = 0
                continue
            if broker.process.pid != pid:
                misses, pid = 0, broker.process.pid
            if embedded_broker.answers_lookups(self.url, topic):
                misses = 0
                self.check_dispatch()
                continue
            misses += 1
            if misses >= self.WATCHDOG_MISSES and broker.process.pid == pid:
                self._flagged = (pid, True, f"has not answered a lookup for {self.WATCHDOG_MISSES} probes in a row")
                misses = 0

    def check_dispatch(self) -> None:
        """Flag the broker when a subscription of a running service has stalled. Only the services'
        own subscriptions count, and only once the broker and those services have run that long."""
        broker = self.broker
        stall = self.settings.broker_stall_seconds
        now = time.monotonic()
        # A stall a restart does not cure must not turn into a restart a minute: back off.
        if broker is None or self.metrics_url is None:
            return
        if now - broker.started_at < stall * 2 ** min(self._stall_streak, 4):
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
        stalled = embedded_broker.stalled_partitions(
            text, f"{self.settings.pulsar_tenant}/{self.settings.pulsar_namespace}", watched, time.time(), stall)
        if not stalled:
            self._stall_streak = 0
        elif broker.process is not None:
            shown = ", ".join(stalled[:4]) + (f" and {len(stalled) - 4} more" if len(stalled) > 4 else "")
            self._flagged = (broker.process.pid, False, f"has handed nothing out for {stall:.0f}s on {shown}")
