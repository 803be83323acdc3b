"""The whole platform (`alpes up`) as a child process in a data directory, on free ports: what the
end-to-end tests, the fault-injection suite, the console's browser tests and `alpes bench` run. It
starts it and waits until every instance (and the console) is healthy, reads `state.json`, kills,
holds and waits for restarts, and stops it. Its databases are SQLite files in the data directory,
or one fresh MariaDB/MySQL database per service (`databases="mariadb"`), created on start and dropped by `close()`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

from .contract import SERVICES
from .kernel.ports import listen_port

T = TypeVar("T")

# What a shell may have configured for a real deployment; a `scratch` platform drops it.
_DEPLOYMENT_VARIABLES = ("ALPES_BROKER_URL", "ALPES_PULSAR_ADMIN_URL", "ALPES_PULSAR_TOKEN", "ALPES_DATA_DIR",
                         "ALPES_HOST")


class PlatformError(RuntimeError):
    """`alpes up` exited before it was ready."""


def create_mariadb_database(server_url: str, prefix: str = "alpes_t") -> tuple[str, Callable[[], None]]:
    """A fresh, empty database on the MariaDB/MySQL server at `server_url`
    (`mysql+pymysql://user:password@host:port`, a user that may create databases); returns its
    SQLAlchemy URL and a function that drops it."""
    import pymysql
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"

    def run(statement: str) -> None:
        connection = pymysql.connect(host=url.host, port=url.port or 3306, user=url.username,
                                     password=url.password or "", autocommit=True, connect_timeout=10)
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    run(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    return f"{server_url.rstrip('/')}/{name}?charset=utf8mb4", lambda: run(f"DROP DATABASE IF EXISTS `{name}`")


def wait_until(check: Callable[[], T], timeout: float = 60.0, interval: float = 0.2, what: str = "condition",
               diagnose: Callable[[], object] | None = None) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds.
    An HTTP error, KeyError or ValueError counts as "not yet"; any other error ends the wait."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, KeyError, ValueError) as error:
            last_error = error
        time.sleep(interval)
    details = ""
    if diagnose is not None:
        try:
            details = f"\n{diagnose()}"
        except Exception as error:  # diagnostics must not hide the timeout
            details = f"\n(diagnostics failed: {error})"
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else "") + details)


class Platform:
    """`env` is added to this process's environment for `alpes up`; `instances` are processes per
    service (default 1). With `scratch`, the shell's broker URL, admin URL, database URLs, data
    directory and host are left out, so the run uses the embedded broker and SQLite in `data_dir`
    whatever the shell is configured for. With `own_session`, `alpes up` does not get the
    terminal's Ctrl-C: the caller stops it. `databases="mariadb"` gives each service its own fresh
    database on the server at `mariadb_server` (ALPES_<SERVICE>_DB_URL; each service migrates it with
    Alembic on start), created by the first `start()` and dropped by `close()`; "sqlite" (default):
    the SQLite files in `data_dir`, or what `env` or the shell says. `broker="pulsar"` runs
    `alpes up --broker pulsar` (a real Apache Pulsar standalone, its admin port free too)."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, instances: dict[str, int] | None = None,
                 *, scratch: bool = False, own_session: bool = False, databases: str = "sqlite",
                 mariadb_server: str | None = None, broker: str = "embedded") -> None:
        if databases not in ("sqlite", "mariadb"):
            raise ValueError(f"databases must be sqlite or mariadb, not {databases!r}")
        if databases == "mariadb" and not mariadb_server:
            raise ValueError("databases='mariadb' needs mariadb_server (mysql+pymysql://user:password@host:port)")
        self.data_dir = data_dir
        self.own_session = own_session
        self.databases = databases
        self.mariadb_server = mariadb_server
        self._drops: list[Callable[[], None]] = []  # one per database created for this platform
        self.instances = {name: 1 for name in SERVICES} | (instances or {})
        # Further instances listen on port + 100 * i (settings).
        self.ports = {name: listen_port(also=[100 * i for i in range(1, self.instances[name])]) for name in SERVICES}
        self.broker_port = listen_port()
        self.console_port = listen_port()
        self.env = dict(os.environ)
        if scratch:
            for key in [k for k in self.env if k in _DEPLOYMENT_VARIABLES
                        or (k.startswith("ALPES_") and k.endswith("_DB_URL"))]:
                del self.env[key]
        self.env.update({f"ALPES_{name.upper()}_PORT": str(port) for name, port in self.ports.items()})
        self.env["ALPES_BROKER_PORT"] = str(self.broker_port)
        self.env["ALPES_CONSOLA_PORT"] = str(self.console_port)
        # Picked here with the others, not by `alpes up` (another process, which cannot know the
        # services' ports before they listen): no two of the platform's ports are the same.
        self.env["ALPES_BROKER_METRICS_PORT"] = str(listen_port())
        self.broker = broker
        if broker == "pulsar":  # its own standalone: a cluster the shell names would contradict it
            for key in ("ALPES_BROKER_URL", "ALPES_PULSAR_ADMIN_URL", "ALPES_PULSAR_TOKEN"):
                self.env.pop(key, None)
            self.env["ALPES_PULSAR_WEB_PORT"] = str(listen_port())
        self.env.update({f"ALPES_{name.upper()}_INSTANCES": str(n) for name, n in self.instances.items()})
        self.env.update(env or {})
        self.process: subprocess.Popen | None = None
        # uvicorn closes a connection idle for 5 s, httpx keeps one for 5 s: a request sent on it as
        # it closes meets "Server disconnected". Idle connections are dropped well before.
        self.http = httpx.Client(timeout=30, limits=httpx.Limits(keepalive_expiry=1.0))
        self.start_seconds: float | None = None  # how long the last start() took
        self.stop_seconds: float | None = None  # how long the last stop() took, when it had to stop it

    # -- addresses ---------------------------------------------------------------------------
    def url(self, service: str) -> str:
        """`marketing` (its first instance) or an instance by its name in state.json, `marketing-2`."""
        if service in self.ports:
            return f"http://127.0.0.1:{self.ports[service]}"
        return self.state()["services"][service]["url"]

    @property
    def console_url(self) -> str:
        """The web console (alpes/consola), e.g. http://127.0.0.1:<port>; sign in at /entrar."""
        return f"http://127.0.0.1:{self.console_port}"

    @property
    def urls(self) -> dict[str, str]:
        """Each service's first instance."""
        return {name: self.url(name) for name in SERVICES}

    def instance_names(self, service: str) -> list[str]:
        return [service] + [f"{service}-{i + 1}" for i in range(1, self.instances[service])]

    def every_instance(self) -> list[str]:
        return [name for service in SERVICES for name in self.instance_names(service)]

    def db_url(self, service: str) -> str:
        """The SQLAlchemy URL of `service`'s database (what `alpes up` gives it)."""
        configured = self.env.get(f"ALPES_{service.upper()}_DB_URL")
        return configured or f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "up.out"

    def get(self, service: str, path: str, **params) -> dict:
        response = self.http.get(self.url(service) + path, params=params)
        response.raise_for_status()
        return response.json()

    def post(self, service: str, path: str, body: dict) -> httpx.Response:
        return self.http.post(self.url(service) + path, json=body)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> Platform:
        """Start `alpes up`; wait up to `timeout` for its state.json, then up to 60 s for each
        instance to answer /health with 200."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if self.databases == "mariadb" and not self._drops:
            self._create_databases()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "alpes", "up", "--data-dir", str(self.data_dir),
                                             "--broker", self.broker],
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=self.own_session)

        def ready() -> bool:
            if self.process.poll() is not None:
                # The log's tail in the error: a test's temporary directory may be gone when it is read.
                tail = "\n".join(self.log().splitlines()[-15:])
                raise PlatformError(f"`alpes up` exited with {self.process.returncode}; {self.log_path} ends:\n{tail}")
            return (self.data_dir / "state.json").exists()

        wait_until(ready, timeout, what=f"alpes up to be ready (see {self.log_path})")
        for name in self.every_instance():
            wait_until(lambda: self.http.get(self.url(name) + "/health").status_code == 200, 60,
                       what=f"{name} healthy")
        wait_until(lambda: self.http.get(self.console_url + "/health").status_code == 200, 60, what="consola up")
        self.start_seconds = time.perf_counter() - started
        return self

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGINT (what Ctrl-C does: the supervisor stops everything), then SIGTERM, then SIGKILL;
        its exit code (None when it was never started)."""
        if self.process is None:
            return None
        self.stop_seconds = None
        if self.process.poll() is None:
            started = time.perf_counter()
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.stop_seconds = time.perf_counter() - started
        code = self.process.returncode
        self.process = None
        return code

    def close(self) -> int | None:
        """Stop it, then drop the databases created for it; `stop()`'s exit code."""
        try:
            return self.stop()
        finally:
            drops, self._drops = self._drops, []
            for drop in drops:
                drop()

    def __enter__(self) -> Platform:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.close()

    def _create_databases(self) -> None:
        for name in SERVICES:
            url, drop = create_mariadb_database(self.mariadb_server, f"alpes_{name}")
            self._drops.append(drop)
            self.env[f"ALPES_{name.upper()}_DB_URL"] = url

    # -- state and faults --------------------------------------------------------------------
    def state(self) -> dict:
        return json.loads((self.data_dir / "state.json").read_text())

    def pid(self, service: str) -> int:
        state = self.state()
        return state["broker_pid"] if service == "broker" else state["services"][service]["pid"]

    def kill(self, service: str) -> int:
        """SIGKILL one service process (or "broker"); returns its pid."""
        pid = self.pid(service)
        os.kill(pid, signal.SIGKILL)
        return pid

    def hold(self, service: str, seconds: float) -> None:
        """Have the supervisor stop `service` cleanly and keep it down for `seconds` (`alpes hold`)."""
        from .supervisor import hold_service

        hold_service(self.data_dir, service, seconds)

    def wait_restarted(self, service: str, old_pid: int, timeout: float = 60.0) -> None:
        wait_until(lambda: self.pid(service) != old_pid, timeout, what=f"{service} restarted")
        # A service instance waits for itself; the broker for every instance (all reconnect).
        for name in self.every_instance() if service == "broker" else [service]:
            wait_until(lambda: self.http.get(self.url(name) + "/health").status_code == 200, timeout,
                       what=f"{name} healthy again")

    # -- keys ---------------------------------------------------------------------------------
    def create_key(self, role: str = "operator", *args: str) -> str:
        """A key from `alpes keys create` (marketing's database, as on a fresh deployment), once
        every service accepts it (they learn it from marketing.eventos)."""
        done = subprocess.run([sys.executable, "-m", "alpes", "keys", "create", "--role", role, *args,
                               "--data-dir", str(self.data_dir)], env=self.env, capture_output=True, text=True,
                              timeout=120, check=True)
        key = done.stdout.strip()
        self.wait_key_known(key)
        return key

    def wait_key_known(self, key: str, timeout: float = 120.0) -> None:
        """Until no service answers 401 to `key` (on /health's `access.key_known` probe, public).
        Two minutes: an embedded broker wedged at start is only restarted after the supervisor's
        watchdog missed three lookups (up to a minute), and the key travels through it."""
        for name in self.every_instance():
            wait_until(lambda: self.http.get(self.url(name) + "/health",
                                             headers={"Authorization": f"Bearer {key}"}).json()
                       .get("access", {}).get("caller_known") is True, timeout, what=f"{name} to learn the key",
                       diagnose=self.diagnostics)

    def authenticate(self, key: str) -> None:
        """Every later request of `self.http` presents `key`."""
        self.http.headers["Authorization"] = f"Bearer {key}"

    def diagnostics(self) -> str:
        """Health of every service (consumer counters, outbox backlog), for failure messages."""
        lines = []
        for name in SERVICES:
            try:
                health = self.http.get(self.url(name) + "/health").json()
            except httpx.HTTPError as error:
                lines.append(f"{name}: unreachable ({error})")
                continue
            lines.append(f"{name}: {health['status']} outbox={health['outbox']}")
            for c in health["consumers"]:
                lines.append(f"  {c['topic']}/{c['subscription']}: received={c['received']} acked={c['acked']} "
                             f"nacked={c['nacked']} connected={c['connected']} last_error={c['last_error']}")
        # What the supervisor did meanwhile (broker repairs, restarts): the log's tail, since a
        # test's temporary directory may be gone when someone reads the failure.
        try:
            state = self.state()
            lines.append("broker restarts: watchdog={} stall={}".format(
                state.get("broker_watchdog_restarts"), state.get("broker_stall_restarts")))
            lines.append(f"{self.log_path} ends:")
            lines.extend("  " + line for line in self.log().splitlines()[-15:])
        except (OSError, ValueError) as error:
            lines.append(f"(state or log unreadable: {error})")
        return "\n".join(lines)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
