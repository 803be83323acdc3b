"""Marketing: programs (campaigns), their commission terms, and the commissions they pay."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")
PENDIENTE = "pendiente"

# What marketing knows of an affiliate, learned on afiliados.eventos.
REGISTRADO = "registrado"  # known (with its country), not yet allowed to take part
HABILITADO = "habilitado"
INHABILITADO = "inhabilitado"
RECHAZADO = "rechazado"

BORRADOR = "borrador"
ACTIVA = "activa"
PAUSADA = "pausada"
FINALIZADA = "finalizada"

# action -> (states it may start from, state it leads to, event it emits)
TRANSICIONES = {
    "activar": ({BORRADOR, PAUSADA}, ACTIVA, "CampanaActivada"),
    "pausar": ({ACTIVA}, PAUSADA, "CampanaPausada"),
    "finalizar": ({BORRADOR, ACTIVA, PAUSADA}, FINALIZADA, "CampanaFinalizada"),
}


class TransicionInvalida(ValueError):
    pass


def transicion(estado: str, accion: str) -> tuple[str, str]:
    """The campaign's next state and the event that says so; a finished campaign stays finished."""
    desde, hacia, evento = TRANSICIONES[accion]
    if estado not in desde:
        raise TransicionInvalida(f"a campaign in state {estado!r} cannot {accion}")
    return hacia, evento


@dataclass(frozen=True)
class Segmentacion:
    """Which affiliates may enroll: an empty criterion admits everyone."""

    paises: frozenset[str] = frozenset()
    canales: frozenset[str] = frozenset()
    categorias: frozenset[str] = frozenset()

    def admite(self, pais: str | None, canal: str | None, categoria: str | None) -> bool:
        return self.criterio_incumplido(pais, canal, categoria) is None

    def criterio_incumplido(self, pais: str | None, canal: str | None, categoria: str | None) -> str | None:
        """The first criterion the affiliate does not meet ("pais", "canal", "categoria"), or None."""
        for nombre, criterio, valor in (("pais", self.paises, pais), ("canal", self.canales, canal),
                                        ("categoria", self.categorias, categoria)):
            if criterio and valor not in criterio:
                return nombre
        return None


# An enrollment (inscripción) of an affiliate in a campaign, with its tracking link.
INSCRIPCION_ACTIVA = "activa"
INSCRIPCION_SUSPENDIDA = "suspendida"  # its affiliate was disabled; reactivated with it

LINK_CODE_LENGTH = 10


def nuevo_link_code() -> str:
    """A short, URL-safe, unguessable tracking code: 10 base32 characters (50 random bits),
    lower case. The unique key on the column is what guarantees uniqueness; collisions are retried."""
    return "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(LINK_CODE_LENGTH))


@dataclass(frozen=True)
class Vigencia:
    fecha_inicio: datetime | None = None
    fecha_fin: datetime | None = None

    def __post_init__(self) -> None:
        if self.fecha_inicio and self.fecha_fin and self.fecha_fin <= self.fecha_inicio:
            raise ValueError("fecha_fin must be after fecha_inicio")

    def incluye(self, momento: datetime) -> bool:
        return (self.fecha_inicio is None or momento >= self.fecha_inicio) and \
            (self.fecha_fin is None or momento < self.fecha_fin)


def calcular_comision(base: Decimal, porcentaje: Decimal) -> Decimal:
    """Commission of a sale: base × percentage, rounded half-up to the cent. Exact decimals only."""
    if base < 0:
        raise ValueError("a commission base cannot be negative")
    if not (Decimal(0) <= porcentaje <= Decimal(100)):
        raise ValueError("a commission percentage lies between 0 and 100")
    return (base * porcentaje / Decimal(100)).quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class NuevaCampana:
    nombre: str
    porcentaje_comision: Decimal
    moneda: str
    vigencia: Vigencia = Vigencia()
    landing_url: str | None = None
    presupuesto: Decimal | None = None
    ventana_atribucion_dias: int = 30
    periodo_bloqueo_dias: int = 30
    segmentacion: Segmentacion = Segmentacion()
    activa: bool = True  # false: created as a draft, activated later
