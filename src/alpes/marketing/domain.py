"""Marketing: programs (campaigns), their commission terms, and the commissions they pay."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal

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


# Which of a visitor's clicks on the campaign (within its window, before the conversion) earns the
# conversion: the latest (last click, the default) or the earliest (first click). conversiones applies it.
ULTIMO_CLICK = "ultimo_click"
PRIMER_CLICK = "primer_click"
MODELOS_ATRIBUCION = (ULTIMO_CLICK, PRIMER_CLICK)


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
    # A click-attributed conversion sooner than this after its click is held (too_fast); None: no minimum.
    min_segundos_click_conversion: int | None = None
    modelo_atribucion: str = ULTIMO_CLICK
    # A conversion worth more than this (campaign currency) is held for review; None: its
    # advertiser's default, if any.
    valor_maximo_conversion: Decimal | None = None

    def __post_init__(self) -> None:
        if self.modelo_atribucion not in MODELOS_ATRIBUCION:
            raise ValueError(f"unknown attribution model {self.modelo_atribucion!r}")


# The terms of a campaign that may change while it runs (PUT /campanas/{id}). Each governs only what
# happens from the change on, so nothing already recorded changes meaning: a commission keeps the lock
# period it was calculated with, a budget never drops below what was spent, an end never moves into
# the past. Left out on purpose:
# - moneda: budget, commissions, payouts and reports already booked are amounts in it;
# - anunciante_id: the owner decides who sees and pays what hangs off the campaign (tenancy);
# - porcentaje_comision: rates change through the versioned, effective-dated commission rules;
# - fecha_inicio, ventana_atribucion_dias, modelo_atribucion, segmentacion: they would re-decide
#   clicks already made and enrolments already granted under the old terms.
TERMINOS_EDITABLES = ("nombre", "presupuesto", "fecha_fin", "landing_url", "valor_maximo_conversion",
                      "min_segundos_click_conversion", "periodo_bloqueo_dias")
# Those that may be cleared (null): no budget, no end, no maximum, no click minimum. The landing URL
# may change but not go: the campaign's tracking links redirect to it.
TERMINOS_OPCIONALES = ("presupuesto", "fecha_fin", "valor_maximo_conversion", "min_segundos_click_conversion")


def terminos_cambiados(actuales: dict, nuevos: dict) -> tuple[str, ...]:
    """The editable terms whose new value differs from the current one, in TERMINOS_EDITABLES order."""
    return tuple(t for t in TERMINOS_EDITABLES if t in nuevos and nuevos[t] != actuales[t])


def maximo_en_moneda(valor: Decimal | None, decimales: int) -> Decimal | None:
    """An advertiser's default maximum conversion value in a campaign's currency: rounded down to
    the currency's minor units (JPY: whole yen), so rounding never raises a maximum."""
    if valor is None:
        return None
    return valor.quantize(Decimal(1).scaleb(-decimales), rounding=ROUND_DOWN)


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


# -- commission rules: ordered, first match wins, effective-dated versions ------------------------
CPA = "cpa"  # a flat amount per conversion
CPS = "cps"  # a percentage of the sale value
TIPOS_REGLA = (CPA, CPS)
TIPOS_CONVERSION = ("sale", "purchase", "lead")  # what conversiones accepts on a postback
PERIODOS_TOPE = ("dia", "semana", "mes", "total")
TOPE_AFILIADO = "tope_afiliado"
PRESUPUESTO = "presupuesto"


@dataclass(frozen=True)
class Regla:
    tipo: str
    monto: Decimal | None = None  # cpa
    porcentaje: Decimal | None = None  # cps
    conversion_type: str | None = None  # None: any type
    afiliado_id: str | None = None  # None: any affiliate (an override names one)
    min_aprobadas: int | None = None  # tier: the affiliate's approved conversions this month (see below)

    def __post_init__(self) -> None:
        if self.tipo not in TIPOS_REGLA:
            raise ValueError(f"unknown rule kind {self.tipo!r}")
        if (self.tipo == CPA) != (self.monto is not None) or (self.tipo == CPS) != (self.porcentaje is not None):
            raise ValueError("a cpa rule has a monto, a cps rule a porcentaje")


@dataclass(frozen=True)
class Tope:
    monto: Decimal
    periodo: str

    def __post_init__(self) -> None:
        if self.periodo not in PERIODOS_TOPE:
            raise ValueError(f"unknown cap period {self.periodo!r}")


@dataclass(frozen=True)
class ConjuntoReglas:
    """One version of a campaign's rules, in force from `vigente_desde` until the next version."""

    version: int
    vigente_desde: datetime
    reglas: tuple[Regla, ...]
    tope_por_afiliado: Tope | None = None


def regla_id(posicion: int) -> str:
    """A rule is named by its 1-based position in its version: (version, "r2") identifies it."""
    return f"r{posicion}"


def version_vigente(versiones: list[ConjuntoReglas], momento: datetime) -> ConjuntoReglas | None:
    """The version in force at `momento`: the newest that started at or before it. None: the
    campaign's flat percentage ("version 0") applies. Not retroactive: a later version never
    recomputes a conversion that happened before it."""
    vigentes = [v for v in versiones if v.vigente_desde <= momento]
    return max(vigentes, key=lambda v: v.version) if vigentes else None


@dataclass(frozen=True)
class ConversionACalcular:
    base: Decimal
    conversion_type: str
    afiliado_id: str
    # The tier count: the affiliate's approved conversions in this campaign in the calendar month
    # (UTC) of this conversion, before it. "Approved" = passed validation, i.e. its commission was
    # booked (also when a cap cut it to zero), and not reversed since (refunded or charged back).
    # Rejected and held conversions never book one. Months are by conversion time, like the caps.
    aprobadas_en_el_mes: int


def elegir_regla(reglas: tuple[Regla, ...], conversion: ConversionACalcular) -> tuple[int | None, list[str]]:
    """The first rule that matches (1-based position) and, for the explanation, why each rule
    before it was skipped."""
    chequeos = []
    for posicion, regla in enumerate(reglas, start=1):
        nombre = f"rule {regla_id(posicion)}"
        if regla.afiliado_id is not None and regla.afiliado_id != conversion.afiliado_id:
            chequeos.append(f"{nombre} skipped: afiliado_id {conversion.afiliado_id} != {regla.afiliado_id}")
        elif regla.conversion_type is not None and regla.conversion_type != conversion.conversion_type:
            chequeos.append(f"{nombre} skipped: conversion_type {conversion.conversion_type} != {regla.conversion_type}")
        elif regla.min_aprobadas is not None and conversion.aprobadas_en_el_mes < regla.min_aprobadas:
            chequeos.append(f"{nombre} skipped: {conversion.aprobadas_en_el_mes} approved conversions this month "
                            f"< min_aprobadas {regla.min_aprobadas}")
        else:
            chequeos.append(f"{nombre} matched ({regla.tipo})")
            return posicion, chequeos
    return None, chequeos


def monto_de_regla(regla: Regla, base: Decimal) -> Decimal:
    if regla.tipo == CPA:
        return regla.monto.quantize(CENT, rounding=ROUND_HALF_UP)
    return calcular_comision(base, regla.porcentaje)


def aplicar_topes(monto: Decimal, restante_afiliado: Decimal | None,
                  restante_presupuesto: Decimal | None) -> tuple[Decimal, str | None]:
    """Cut the amount to what the affiliate's cap and the campaign budget still allow (None:
    unlimited). A cut commission is booked with the reason, never dropped; when both cut, the
    tighter one is named."""
    limitado_por = None
    for restante, razon in ((restante_afiliado, TOPE_AFILIADO), (restante_presupuesto, PRESUPUESTO)):
        disponible = None if restante is None else max(restante, Decimal(0)).quantize(CENT)
        if disponible is not None and monto > disponible:
            monto, limitado_por = disponible, razon
    return monto, limitado_por


@dataclass(frozen=True)
class Calculo:
    """A commission with its lineage: which rule of which version, from which inputs, capped how."""

    monto: Decimal
    monto_sin_tope: Decimal
    version: int  # 0: no rule set in force, the campaign's flat percentage
    regla_id: str | None
    tipo: str
    porcentaje: Decimal  # of the sale value (0 for a flat cpa amount)
    monto_fijo: Decimal | None
    limitado_por: str | None
    chequeos: tuple[str, ...]


def calcular(conjunto: ConjuntoReglas | None, porcentaje_campana: Decimal, conversion: ConversionACalcular,
             restante_afiliado: Decimal | None, restante_presupuesto: Decimal | None) -> Calculo:
    """The commission of one conversion under the rules in force: the first matching rule, else
    the campaign's percentage; then the affiliate cap and the campaign budget."""
    posicion, chequeos = elegir_regla(conjunto.reglas, conversion) if conjunto else (None, [])
    if posicion is None:
        chequeos.append(f"no rule matched: campaign porcentaje_comision {porcentaje_campana}")
        regla = Regla(CPS, porcentaje=porcentaje_campana)
    else:
        regla = conjunto.reglas[posicion - 1]
    bruto = monto_de_regla(regla, conversion.base)
    monto, limitado_por = aplicar_topes(bruto, restante_afiliado, restante_presupuesto)
    chequeos.append(f"caps: affiliate remaining {restante_afiliado if restante_afiliado is not None else 'unlimited'}, "
                    f"budget remaining {restante_presupuesto if restante_presupuesto is not None else 'unlimited'}"
                    + (f": cut {bruto} to {monto} ({limitado_por})" if limitado_por else ": within"))
    return Calculo(monto=monto, monto_sin_tope=bruto, version=conjunto.version if conjunto else 0,
                   regla_id=regla_id(posicion) if posicion else None, tipo=regla.tipo,
                   porcentaje=regla.porcentaje if regla.tipo == CPS else Decimal(0),
                   monto_fijo=regla.monto, limitado_por=limitado_por, chequeos=tuple(chequeos))


def ventana_del_periodo(periodo: str, momento: datetime) -> tuple[datetime | None, datetime | None]:
    """[desde, hasta) of the cap period holding `momento` (UTC calendar day, ISO week from
    Monday, calendar month); "total" has no bounds."""
    dia = momento.replace(hour=0, minute=0, second=0, microsecond=0)
    if periodo == "dia":
        return dia, dia + timedelta(days=1)
    if periodo == "semana":
        lunes = dia - timedelta(days=dia.weekday())
        return lunes, lunes + timedelta(days=7)
    if periodo == "mes":
        return inicio_del_mes(momento), inicio_del_mes(inicio_del_mes(momento) + timedelta(days=32))
    if periodo == "total":
        return None, None
    raise ValueError(f"unknown cap period {periodo!r}")


def inicio_del_mes(momento: datetime) -> datetime:
    return momento.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def email_sha256(email: str) -> str:
    """The affiliate's email as conversiones compares it with a customer's for self-referral: the
    sha256 of the address stripped and lower-cased (the same normalization on both sides)."""
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()
