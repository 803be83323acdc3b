"""Marketing: programs (campaigns), their commission terms, and the commissions they pay."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
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


# -- the commission lifecycle: pendiente → aprobada → pagada, or revertida from any of them ----
APROBADA = "aprobada"
PAGADA = "pagada"
REVERTIDA = "revertida"

# Why a commission is reversed: its sale was refunded, or the payment was charged back.
REEMBOLSO = "reembolso"
CONTRACARGO = "contracargo"
MOTIVOS_REVERSION = (REEMBOLSO, CONTRACARGO)


def aprobable_desde(calculada_en: datetime, periodo_bloqueo_dias: int) -> datetime:
    """A commission is held for its campaign's lock period (the one in force when it was
    calculated), then approved. A lock period of 0 days approves it at the next run."""
    if periodo_bloqueo_dias < 0:
        raise ValueError("a lock period cannot be negative")
    return calculada_en + timedelta(days=periodo_bloqueo_dias)


class ReversionInvalida(ValueError):
    pass


@dataclass(frozen=True)
class Reversion:
    estado_anterior: str
    ajuste: Decimal | None  # a negative amount carried into the affiliate's next payout


def revertir(estado: str, monto: Decimal, en_un_pago: bool) -> Reversion:
    """Reverse a commission. One already committed to a payout is never taken out of it (a
    payout is history): the money is clawed back by a negative adjustment in the next one."""
    if estado == REVERTIDA:
        raise ReversionInvalida("the commission is already reversed")
    return Reversion(estado, -monto if en_un_pago else None)


@dataclass(frozen=True)
class LineaPago:
    tipo: str  # "comision" or "ajuste"
    referencia_id: str
    monto: Decimal


@dataclass(frozen=True)
class PropuestaPago:
    """A payout for one affiliate in one currency: its amount is, by definition, its lines' sum."""

    afiliado_id: str
    moneda: str
    lineas: tuple[LineaPago, ...]

    @property
    def monto(self) -> Decimal:
        return sum((linea.monto for linea in self.lineas), Decimal("0.00"))


def proponer_pago(afiliado_id: str, moneda: str, comisiones: list[LineaPago], ajustes: list[LineaPago],
                  umbral: Decimal) -> PropuestaPago | None:
    """Every approved, unpaid commission plus every outstanding negative adjustment, once their
    sum reaches the threshold; below it (or negative) they wait for more commissions."""
    if not comisiones:
        return None
    propuesta = PropuestaPago(afiliado_id, moneda, tuple(comisiones) + tuple(ajustes))
    return propuesta if propuesta.monto >= umbral and propuesta.monto > 0 else None

# A payout's states: created with its lines, then paid (once).
PAGO_PENDIENTE = "pendiente"
PAGO_PAGADO = "pagado"
