"""Configuration: embedded defaults, production by environment variables only.

ALPES_DATA_DIR            data directory (SQLite files, broker store, logs); default ./.alpes
ALPES_BROKER_URL          pulsar://host:6650 of a real Pulsar; unset: the embedded broker (the one
                          setting that says which broker: everything done only for the embedded
                          one follows from it)
ALPES_BROKER_PORT         port of the embedded broker on 127.0.0.1; default 6650
ALPES_BROKER_METRICS_PORT loopback port of the embedded broker's Prometheus metrics; default a free one
ALPES_PULSAR_ADMIN_URL    http://host:8080 of that cluster, for `alpes provision` and the backlog in /health
ALPES_PULSAR_TOKEN        JWT this process presents to Apache Pulsar (its role's; the super-user's for
                          `alpes provision`); unset: no authentication
ALPES_PULSAR_WEB_PORT     admin/HTTP port of the standalone `alpes up --broker pulsar` runs; default 8080
                          (its binary port is ALPES_BROKER_PORT)
ALPES_PULSAR_LAUNCHER     that standalone's launcher; default deploy/pulsar/run-standalone.sh of the checkout
ALPES_PULSAR_TENANT       default public
ALPES_PULSAR_NAMESPACE    default default
ALPES_<SERVICE>_DB_URL    SQLAlchemy URL per service, e.g. mysql+pymysql://u:p@db/afiliados
ALPES_<SERVICE>_PORT      HTTP port per service (8001-8004 by default)
ALPES_<SERVICE>_INSTANCES processes of that service run by `alpes up` (default 1)
ALPES_CONSOLA_PORT        HTTP port of the web console (default 8000)
ALPES_CONSOLA_SERVICES_HOST  host the console calls the services on (`{service}` stands for each service's
                          name, e.g. `{service}` alone on Compose); default ALPES_HOST
ALPES_CONSOLA_IDLE_MINUTES   a console session idle this long is signed out; default 30
ALPES_CONSOLA_TRACKING_URL   public base URL of conversiones' tracking links (/r/<code>) shown to affiliates;
                          default the address the console calls conversiones on
ALPES_SUBSCRIPTION_TYPE   key_shared (default) or failover
ALPES_MAX_CONVERSIONS_PER_IP  conversions per IP and campaign in 60 minutes before holding them; default 5
ALPES_MAX_CONVERSIONS_PER_CALLER  conversions per caller and campaign in 60 minutes before holding them; default 10000
ALPES_TRUSTED_PROXIES     comma-separated addresses/CIDRs of reverse proxies whose X-Forwarded-For/-Proto
                          are believed; default none (the headers are ignored)
ALPES_MAX_BODY_BYTES      largest request body a service reads (larger: 413); default 65536
ALPES_OUTBOX_KEEP_SENT_HOURS  how long each service keeps its outbox's sent rows; default 24
ALPES_BROKER_WATCHDOG_SECONDS  how often `alpes up` checks that the embedded broker answers; default 10
ALPES_BROKER_STALL_SECONDS  how long messages may wait with none handed out before it restarts it; default 20
ALPES_EVENT_SIGNING_KEYS  comma-separated hex secrets (32+ bytes each) that sign every message the
                          services publish; the first signs, all verify. Unset: one key kept in
                          the data directory (event-signing.key), for one machine only
ALPES_PII_MASTER_KEYS     comma-separated hex secrets (32+ bytes each) that wrap afiliados' per-affiliate
                          data keys; the first wraps, all unwrap. Unset: one key kept in the data
                          directory (pii-master.key), for one machine only
ALPES_AUTH                auto (default): protected local mode, anonymous callers are the operator while
                          no API key exists and ALPES_HOST is loopback; required: every non-public route
                          needs a key (always so on a non-loopback ALPES_HOST)
ALPES_REDIS_URL           redis://host:6379/0 for the rate-limit counters shared by a service's instances;
                          unset: counted in each process
ALPES_RATE_LIMIT_*        requests per minute: POSTBACKS_PER_KEY (60000), POSTBACKS_PER_IP (6000),
                          CLICKS_PER_IP (600) before 429 with Retry-After
ALPES_POSTBACK_SIGNING_KEYS  comma-separated hex secrets (32+ bytes) from which each advertiser's postback
                          signing secret is derived (marketing shows it, conversiones verifies); the first
                          derives, all verify. Unset: derived from the event-signing keys
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT  OpenTelemetry's own: where spans go
                          over OTLP/HTTP (read by kernel/tracing.py, not here); unset: none recorded
ALPES_CONVERSIONES_CLOCK_OFFSET_SECONDS  test/demo knob: conversiones runs this many seconds ahead
                          (clicks, postbacks, validations); default 0. Never in production.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .contract import CONSOLE_PORT, SERVICES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALPES_", env_file=None, extra="ignore")

    data_dir: Path = Path(".alpes")
    host: str = "127.0.0.1"
    broker_url: str | None = None
    broker_port: int = 6650
    # The embedded broker's Prometheus port on 127.0.0.1 (subscription backlog); 0: `alpes up` picks
    # a free one and hands it to its services.
    broker_metrics_port: int = 0
    # `alpes up` probes the embedded broker this often; after 3 unanswered probes in a row it restarts it.
    broker_watchdog_seconds: float = Field(10.0, gt=0)
    # ... and restarts it when a subscription's messages wait with nothing dispatched for this long.
    broker_stall_seconds: float = Field(20.0, gt=0)
    pulsar_admin_url: str | None = None
    pulsar_tenant: str = "public"
    pulsar_namespace: str = "default"
    # The JWT presented to Apache Pulsar (client and admin REST calls); None: no authentication.
    pulsar_token: str | None = Field(None, repr=False)
    # `alpes up --broker pulsar`: the standalone's admin port (its binary port is broker_port) and launcher.
    pulsar_web_port: int = 8080
    pulsar_launcher: Path | None = None

    afiliados_db_url: str | None = None
    conversiones_db_url: str | None = None
    marketing_db_url: str | None = None
    auditoria_db_url: str | None = None

    afiliados_port: int = SERVICES["afiliados"]
    conversiones_port: int = SERVICES["conversiones"]
    marketing_port: int = SERVICES["marketing"]
    auditoria_port: int = SERVICES["auditoria"]
    # The web console (alpes/consola): its port, where it finds the services, its sessions' idle limit.
    consola_port: int = CONSOLE_PORT
    consola_services_host: str | None = None
    consola_idle_minutes: float = Field(30.0, gt=0, le=24 * 60)
    consola_tracking_url: str | None = None

    # Processes per service run by `alpes up` (`--instances marketing=2`); instance i > 0 listens
    # on the service's port + 100 * i and shares the service's database.
    afiliados_instances: int = Field(1, ge=1, le=9)
    conversiones_instances: int = Field(1, ge=1, le=9)
    marketing_instances: int = Field(1, ge=1, le=9)
    auditoria_instances: int = Field(1, ge=1, le=9)
    # Which instance of its service this process is (set by `alpes up`): consumer ids and names.
    instance_index: int = Field(0, ge=0)

    max_redeliveries: int = Field(5, ge=1)
    # Both keep per-aggregate order. Key_Shared shares keys over instances and, on the embedded
    # broker, is the one whose acknowledgements hold. See README "Scaling".
    subscription_type: Literal["failover", "key_shared"] = "key_shared"
    # How long conversiones waits to learn of an affiliate/campaign it has not heard of yet
    # (events are eventually consistent) before rejecting a conversion that names it.
    reference_grace_seconds: float = Field(10.0, ge=0)
    # More conversions than this from one IP for one campaign within 60 minutes: held (ip_velocity).
    max_conversions_per_ip: int = Field(5, ge=1)
    # ... and more than this from one caller (today its address; the API key once callers have
    # keys), with or without an `ip` in the postback: held (caller_velocity).
    max_conversions_per_caller: int = Field(10_000, ge=1)
    # Reverse proxies (addresses or CIDR networks, comma-separated) whose X-Forwarded-For and
    # X-Forwarded-Proto are believed; from any other peer those headers are ignored. Default none.
    trusted_proxies: str = ""
    # A test/demo knob: conversiones stamps clicks and conversions and decides validations this many
    # seconds ahead of the real clock, so time-dependent rules (the attribution window) can be shown
    # by restarting the platform "later" with the same data. 0 in production.
    conversiones_clock_offset_seconds: float = Field(0.0, ge=0, le=366 * 24 * 3600)
    consumer_batch_size: int = Field(200, ge=1, le=5000)
    # How long each service keeps its outbox's sent rows (read by nothing once the broker holds the
    # message; kept a while for whoever looks into an incident), in hours.
    outbox_keep_sent_hours: float = Field(24.0, gt=0, le=24 * 366)
    # Largest HTTP request body read (bytes); a larger one is refused with 413 before it is parsed.
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Commission lifecycle (marketing): how often pending commissions past their lock period are
    # approved, how often payouts are created, and the least a payout may pay (in its currency).
    # Every 5 s: a campaign without a lock period sees its commissions approved within seconds; an
    # idle run is one indexed read.
    approval_interval_seconds: float = Field(5.0, gt=0)
    payout_interval_seconds: float = Field(3600.0, gt=0)
    payout_threshold: Decimal = Field(Decimal("50.00"), ge=0, decimal_places=2)
    # The conversion → commission saga (conversiones): how long it waits for marketing's answer
    # before asking again, and how many times it asks again before it calls itself stuck (alert on
    # sistema.eventos, counted in /health). Stuck, it keeps asking, waiting twice as long after each
    # request up to saga_max_backoff_seconds: no answer is never taken for a refusal.
    saga_timeout_seconds: float = Field(120.0, gt=0)
    saga_max_retries: int = Field(3, ge=0, le=100)
    saga_max_backoff_seconds: float = Field(600.0, gt=0)

    # Secrets that sign and verify every message (kernel/signing.py): the same on every service.
    event_signing_keys: str | None = Field(None, repr=False)
    # Master keys that wrap afiliados' per-affiliate data keys (afiliados/pii.py): comma-separated hex
    # secrets (32+ bytes each); the first wraps, all unwrap. Unset: <data dir>/pii-master.key.
    pii_master_keys: str | None = Field(None, repr=False)

    # Identity and access (kernel/access.py, README "Access").
    auth: Literal["auto", "required"] = "auto"
    redis_url: str | None = Field(None, repr=False)
    rate_limit_postbacks_per_key: int = Field(60_000, ge=1)
    rate_limit_postbacks_per_ip: int = Field(6_000, ge=1)
    rate_limit_clicks_per_ip: int = Field(600, ge=1)
    postback_signing_keys: str | None = Field(None, repr=False)

    # Webhooks (marketing/webhooks.py, README "Webhooks"). A failed delivery is retried after
    # base × 2^(n-1) seconds (±25 % jitter, at most max_delay) until retry_for seconds have passed
    # since its first attempt, then marked failed; an endpoint is disabled after
    # disable_after_failures consecutive failed attempts. Tests shrink the times.
    webhook_retry_base_seconds: float = Field(1.0, gt=0)
    webhook_retry_max_delay_seconds: float = Field(3600.0, gt=0)
    webhook_retry_for_seconds: float = Field(24 * 3600.0, gt=0)
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    webhook_disable_after_failures: int = Field(20, ge=1)
    webhook_dispatch_interval_seconds: float = Field(1.0, gt=0)
    # TEST ONLY: accept http URLs and private/loopback addresses outside the protected local mode
    # (a receiver on 127.0.0.1 with ALPES_AUTH=required). Never in production: it opens SSRF.
    webhook_allow_private: bool = False

    @property
    def webhook_private_targets(self) -> bool:
        """http and private/loopback webhook targets are accepted (protected local mode, or tests)."""
        return self.protected_local_mode or self.webhook_allow_private

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        from .kernel.proxies import parse_networks

        parse_networks(value)  # refused at start-up rather than ignored
        return value

    def signing_keys(self) -> list[bytes]:
        from .kernel.signing import local_key, parse_keys

        if self.event_signing_keys:
            return parse_keys(self.event_signing_keys)
        return [local_key(self.data_dir.resolve() / "event-signing.key")]

    def postback_keys(self) -> list[bytes]:
        """The master secrets of advertisers' postback signing secrets (kernel/request_signing.py)."""
        from .kernel.signing import parse_keys

        if self.postback_signing_keys:
            return parse_keys(self.postback_signing_keys)
        # Derived, so one local platform needs no second key file; a different label keeps the two apart.
        return [hmac.new(k, b"alpes postback signing", hashlib.sha256).digest() for k in self.signing_keys()]

    @property
    def protected_local_mode(self) -> bool:
        """Anonymous callers may act as the operator (until the first key): only `auth=auto` on loopback."""
        if self.auth == "required":
            return False
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def pii_keys(self) -> list[bytes]:
        from .kernel.signing import local_key, parse_keys

        if self.pii_master_keys:
            return parse_keys(self.pii_master_keys)
        return [local_key(self.data_dir.resolve() / "pii-master.key")]

    def db_url(self, service: str) -> str:
        url = getattr(self, f"{service}_db_url")
        if url:
            return url
        return f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    def port(self, service: str) -> int:
        return getattr(self, f"{service}_port")

    def instances(self, service: str) -> int:
        return getattr(self, f"{service}_instances")

    def instance_port(self, service: str, index: int) -> int:
        return self.port(service) + 100 * index

    @property
    def embedded_broker(self) -> bool:
        """No broker URL: the embedded broker on 127.0.0.1:`broker_port` (what `alpes up` runs)."""
        return not self.broker_url

    def resolved_broker_url(self) -> str:
        return self.broker_url or f"pulsar://127.0.0.1:{self.broker_port}"

    def embedded_metrics_url(self) -> str | None:
        """The embedded broker's Prometheus endpoint, when its port is known."""
        if not self.embedded_broker or not self.broker_metrics_port:
            return None
        return f"http://127.0.0.1:{self.broker_metrics_port}/metrics"
