"""`alpes up --broker pulsar`'s side of a real Apache Pulsar standalone: run it, provision it,
keep it running.

Start: resolve the classpath (once, bounded), make the credentials, start the JVM through the
launcher as a supervised child on `<data dir>/pulsar`, wait until it is ready, provision the
contract (topics, dead-letter topics, subscriptions, namespace policies, permissions) and verify
it. Each service then gets ALPES_BROKER_URL, ALPES_PULSAR_ADMIN_URL and its own role's token
(ALPES_PULSAR_TOKEN). A JVM that dies is started again on the same data directory and ports (the
services reconnect by themselves); nothing else is ever restarted: Apache Pulsar needs none of
the embedded broker's repairs (supervisor_embedded.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console

from .child_process import Child
from .contract import ADMIN_ROLE
from .kernel.ports import listen_port
from .provisioning import provision_pulsar
from .pulsar_standalone import (Credentials, auth_conf, ensure_credentials, find_launcher, pulsar_version,
                                resolve_classpath, wait_ready)
from .settings import Settings


class PulsarStandaloneSupervision:
    def __init__(self, settings: Settings, data_dir: Path, console: Console) -> None:
        self.settings = settings
        self.console = console
        self.data_dir = data_dir
        self.home = data_dir / "pulsar"  # the launcher's DATA_DIR: metadata, bookkeeper, conf, logs
        self.url = f"pulsar://127.0.0.1:{settings.broker_port}"
        self.admin_url = f"http://127.0.0.1:{settings.pulsar_web_port}"
        self.broker: Child | None = None
        self.credentials: Credentials | None = None
        self.version = "?"

    @property
    def label(self) -> str:
        return f"broker (Apache Pulsar {self.version})"

    def table_rows(self) -> list[tuple[str, str, str]]:
        """Further rows of `alpes up`'s start-up table: the admin API and where the tokens are."""
        assert self.credentials is not None
        return [("pulsar admin API (JWT)", self.admin_url, "-"),
                ("pulsar tokens (0600)", str(self.credentials.directory), "-")]

    def start(self) -> str:
        """Build (once), start, wait for, provision and verify the standalone; its URL."""
        launcher = find_launcher(self.settings.pulsar_launcher)
        self.version = pulsar_version(launcher)
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        resolve_classpath(launcher, logs / "pulsar-maven.log")
        self.credentials = ensure_credentials(self.home / "auth")
        extra_conf = self.home / "auth.conf"
        extra_conf.write_text(auth_conf(self.credentials), encoding="utf-8")  # paths only, no secret
        env = {**os.environ, "PULSAR_STANDALONE_EXTRA_CONF": str(extra_conf),
               "PULSAR_BOOKIE_PORT": str(self._bookie_port())}
        command = [str(launcher), str(self.home), str(self.settings.broker_port), str(self.settings.pulsar_web_port)]
        self.broker = Child("broker", command, env, logs / "broker.log")
        self.broker.start()
        # soft_wrap: one line each, also in a log file (tests read them)
        self.console.print(f"starting Apache Pulsar {self.version} (pid {self.pid()}; log {self.home / 'logs'})",
                           soft_wrap=True)
        admin_token = self.credentials.token(ADMIN_ROLE)
        took = wait_ready(self.admin_url, admin_token, self.broker.process)
        self.console.print(f"Apache Pulsar {self.version} ready in {took:.1f}s", soft_wrap=True)
        started = time.monotonic()
        report = provision_pulsar(self.settings, self.admin_url, admin_token)
        self.console.print(f"{report.summary()} ({time.monotonic() - started:.1f}s)", soft_wrap=True)
        return self.url

    def _bookie_port(self) -> int:
        """The in-process bookie's port: chosen once per data directory (outside the ephemeral
        range, so a restart can bind it again) and kept, since the bookie's cookie records it."""
        path = self.home / "bookie-port.json"
        if path.exists():
            return int(json.loads(path.read_text(encoding="utf-8"))["port"])
        port = listen_port()
        self.home.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"port": port}), encoding="utf-8")
        return port

    def service_env(self, service: str) -> dict[str, str]:
        """How a service reaches the broker, as its own role."""
        assert self.credentials is not None
        return {"ALPES_BROKER_URL": self.url, "ALPES_PULSAR_ADMIN_URL": self.admin_url,
                "ALPES_PULSAR_TOKEN": self.credentials.service_token(service)}

    def pid(self) -> int | None:
        return self.broker.process.pid if self.broker and self.broker.process else None

    def state(self) -> dict:
        assert self.credentials is not None
        return {"broker": "pulsar", "broker_pid": self.pid(),
                "broker_restarts": self.broker.restarts if self.broker else 0,
                "pulsar_admin_url": self.admin_url,
                "pulsar_admin_token_file": str(self.credentials.token_file(ADMIN_ROLE)),
                "broker_watchdog_restarts": 0, "broker_stall_restarts": 0}

    def repair(self) -> bool:
        """Start the JVM again when it exited (same data, same ports); True when it was."""
        if self.broker is None or self.broker.alive() or not self.broker.restart_due(self.console):
            return False
        self.broker.start()
        return True

    def stop(self) -> None:
        if self.broker:
            self.broker.stop()  # SIGTERM: a clean stop takes ~4 s (exit 143)
