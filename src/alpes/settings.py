"""Configuration: embedded defaults, production by environment variables only.

ALPES_DATA_DIR            data directory (SQLite files, broker store, logs); default ./.alpes
ALPES_BROKER_URL          pulsar://host:6650 of a real Pulsar; unset: the embedded broker
ALPES_PULSAR_ADMIN_URL    http://host:8080 of that cluster, for `alpes provision`
ALPES_PULSAR_TENANT       default public
ALPES_PULSAR_NAMESPACE    default default
ALPES_<SERVICE>_DB_URL    SQLAlchemy URL per service, e.g. mysql+pymysql://u:p@db/afiliados
ALPES_<SERVICE>_PORT      HTTP port per service (8001-8004 by default)
ALPES_MAX_CONVERSIONS_PER_IP  conversions per IP and campaign in 60 minutes before holding them; default 5
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .contract import SERVICES


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALPES_", env_file=None, extra="ignore")

    data_dir: Path = Path(".alpes")
    host: str = "127.0.0.1"
    broker_url: str | None = None
    broker_port: int = 6650
    pulsar_admin_url: str | None = None
    pulsar_tenant: str = "public"
    pulsar_namespace: str = "default"

    afiliados_db_url: str | None = None
    conversiones_db_url: str | None = None
    marketing_db_url: str | None = None
    auditoria_db_url: str | None = None

    afiliados_port: int = SERVICES["afiliados"]
    conversiones_port: int = SERVICES["conversiones"]
    marketing_port: int = SERVICES["marketing"]
    auditoria_port: int = SERVICES["auditoria"]

    max_redeliveries: int = Field(5, ge=1)
    # failover (default; safe on pulsar-lite) or key_shared (a real Pulsar cluster).
    subscription_type: Literal["failover", "key_shared"] = "failover"
    # How long conversiones waits to learn of an affiliate/campaign it has not heard of yet
    # (events are eventually consistent) before rejecting a conversion that names it.
    reference_grace_seconds: float = Field(10.0, ge=0)
    # More conversions than this from one IP for one campaign within 60 minutes: held (ip_velocity).
    max_conversions_per_ip: int = Field(5, ge=1)
    consumer_batch_size: int = Field(200, ge=1, le=5000)
    # Commission lifecycle (marketing): how often pending commissions past their lock period are
    # approved, how often payouts are created, and the least a payout may pay (in its currency).
    approval_interval_seconds: float = Field(30.0, gt=0)
    payout_interval_seconds: float = Field(3600.0, gt=0)
    payout_threshold: Decimal = Field(Decimal("50.00"), ge=0, decimal_places=2)

    def db_url(self, service: str) -> str:
        url = getattr(self, f"{service}_db_url")
        if url:
            return url
        return f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    def port(self, service: str) -> int:
        return getattr(self, f"{service}_port")

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url

    def resolved_broker_url(self) -> str:
        return self.broker_url or f"pulsar://127.0.0.1:{self.broker_port}"
