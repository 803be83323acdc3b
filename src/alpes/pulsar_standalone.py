"""The Apache Pulsar standalone of `alpes up --broker pulsar`: its launcher, credentials and readiness.

The launcher is `deploy/pulsar/run-standalone.sh` of the source checkout, and only it: it resolves
pulsar-broker's jars from Maven Central with `deploy/pulsar/pom.xml` (once, cached), renders
`deploy/pulsar/standalone.conf` with the ports and the extra settings given here, and execs the
JVM (so its pid is the broker's). Python calls it twice: `--resolve-classpath` with a time limit
(the first run downloads ~270 MB), then to run the broker as a supervised child. It is found next
to this package in an editable install (`pip install -e .`), or where ALPES_PULSAR_LAUNCHER says.

Credentials live in `<data dir>/pulsar/auth/` (0600): the HMAC secret the broker verifies JWTs
with (raw random bytes: Pulsar uses a `file://` key's bytes as they are) and one token per role,
minted with PyJWT: `admin` (the super-user: provisioning, and the broker's own internal client)
and one per service (contract.broker_role).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .contract import ADMIN_ROLE, SERVICES, broker_role

LAUNCHER = Path("deploy") / "pulsar" / "run-standalone.sh"
RESOLVE_TIMEOUT_SECONDS = 900  # a first resolution into an empty ~/.m2 took ~60 s here
READY_TIMEOUT_SECONDS = 180  # the spike saw up to ~26 s on a loaded machine


class StandaloneError(RuntimeError):
    """The standalone could not be found, built or started; the message says what to do."""


def find_launcher(configured: Path | None = None) -> Path:
    """run-standalone.sh: ALPES_PULSAR_LAUNCHER, else the checkout this package is installed from."""
    candidate = configured or Path(__file__).resolve().parents[2] / LAUNCHER
    if not candidate.is_file() or not os.access(candidate, os.X_OK):
        raise StandaloneError(
            f"`alpes up --broker pulsar` runs {LAUNCHER} of an AlpesPartner source checkout "
            f"(installed with `pip install -e .`), and there is no executable one at {candidate}. "
            "Run it from the checkout, or set ALPES_PULSAR_LAUNCHER to that script.")
    if not (candidate.parent / "pom.xml").is_file():
        raise StandaloneError(f"{candidate.parent / 'pom.xml'} is missing: the launcher needs its Maven project")
    return candidate


def pulsar_version(launcher: Path) -> str:
    """The Apache Pulsar version its pom.xml pins."""
    match = re.search(r"<pulsar\.version>([^<]+)</pulsar\.version>", (launcher.parent / "pom.xml").read_text())
    return match.group(1) if match else "?"


def resolve_classpath(launcher: Path, maven_log: Path, timeout: float = RESOLVE_TIMEOUT_SECONDS) -> None:
    """Have the launcher resolve (or just check) the cached classpath, within `timeout`. When Maven
    has to run, the launcher says so in one line on stderr (passed through) and logs Maven to `maven_log`."""
    env = {**os.environ, "PULSAR_MVN_LOG": str(maven_log)}
    process = subprocess.Popen([str(launcher), "--resolve-classpath"], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # bash and the Maven JVM under it
        process.wait()
        raise StandaloneError(f"resolving Apache Pulsar's jars took more than {timeout:.0f}s; "
                              f"see {maven_log}") from None
    if code != 0:
        raise StandaloneError(f"{launcher} --resolve-classpath failed (exit {code}); see {maven_log}")


# -- credentials ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    directory: Path

    @property
    def secret_file(self) -> Path:
        return self.directory / "secret.key"

    def token_file(self, role: str) -> Path:
        return self.directory / f"{role}.token"

    def token(self, role: str) -> str:
        return self.token_file(role).read_text(encoding="utf-8").strip()

    def service_token(self, service: str) -> str:
        return self.token(broker_role(service))


def _write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, created that way (never readable for a moment)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    tmp.replace(path)


def ensure_credentials(directory: Path) -> Credentials:
    """The secret (made once per data directory, kept so tokens stay valid across restarts) and a
    token for `admin` and for each service's role (minted again each time: the same secret and
    subject give the same token). HS256, no expiry: a local broker on loopback."""
    import jwt  # PyJWT

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    credentials = Credentials(directory)
    if not credentials.secret_file.exists():
        _write_private(credentials.secret_file, os.urandom(32))  # HS256 wants at least 32 bytes
    key = credentials.secret_file.read_bytes()
    for role in [ADMIN_ROLE, *(broker_role(s) for s in SERVICES)]:
        _write_private(credentials.token_file(role), jwt.encode({"sub": role}, key, algorithm="HS256").encode())
    return credentials


def auth_conf(credentials: Credentials) -> str:
    """Settings appended to standalone.conf (PULSAR_STANDALONE_EXTRA_CONF): JWT authentication,
    authorization with `admin` as super-user, the broker's internal client authenticated as admin
    (it creates the cluster, tenant and namespace and runs the health check), and no automatic
    topic creation: every topic is provisioned, so a misspelt one fails instead of appearing."""
    return "\n".join([
        "authenticationEnabled=true",
        "authenticationProviders=org.apache.pulsar.broker.authentication.AuthenticationProviderToken",
        f"tokenSecretKey=file://{credentials.secret_file}",
        "authorizationEnabled=true",
        f"superUserRoles={ADMIN_ROLE}",
        "brokerClientAuthenticationPlugin=org.apache.pulsar.client.impl.auth.AuthenticationToken",
        f"brokerClientAuthenticationParameters=file://{credentials.token_file(ADMIN_ROLE)}",
        "allowAutoTopicCreation=false",
        "",
    ])


# -- readiness --------------------------------------------------------------------------------
def wait_ready(admin_url: str, token: str | None, process: subprocess.Popen | None,
               timeout: float = READY_TIMEOUT_SECONDS) -> float:
    """Wait until namespace public/default exists and the broker's health check passes (the web
    server answers, and the health check can pass, before the standalone has created the
    namespace); the seconds it took. Fails when the process exits."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=f"{admin_url}/admin/v2", headers=headers, timeout=5) as http:
        while time.monotonic() - started < timeout:
            if process is not None and process.poll() is not None:
                raise StandaloneError(f"Apache Pulsar exited with code {process.returncode} during start-up")
            try:
                namespaces = http.get("/namespaces/public")
                if (namespaces.status_code == 200 and "public/default" in namespaces.json()
                        and http.get("/brokers/health").status_code == 200):
                    return time.monotonic() - started
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
    raise StandaloneError(f"Apache Pulsar was not ready after {timeout:.0f}s")
