"""Afiliados: partners who register, get validated, and earn commissions."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

REGISTRADO = "registrado"
VALIDADO = "validado"
RECHAZADO = "rechazado"
SUSPENDIDO = "suspendido"
ESTADOS = (REGISTRADO, VALIDADO, RECHAZADO, SUSPENDIDO)

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")

# Throw-away inbox providers: a partner paid real money must be reachable.
DISPOSABLE_DOMAINS = frozenset({
    "mailinator.com", "guerrillamail.com", "10minutemail.com", "tempmail.com", "temp-mail.org",
    "yopmail.com", "trashmail.com", "sharklasers.com", "getnada.com", "dispostable.com",
})


TIPOS_DOCUMENTO = ("CC", "CE", "NIT", "PASAPORTE", "DNI")
METODOS_PAGO = ("transferencia", "paypal", "payoneer")
NUMERO_DOCUMENTO = re.compile(r"^[A-Za-z0-9]{4,20}$")

# ISO 3166-1 alpha-2, every officially assigned code: a country we cannot name is refused, not guessed.
PAISES = frozenset({
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ", "BA", "BB",
    "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS", "BT", "BV", "BW", "BY",
    "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN", "CO", "CR", "CU", "CV", "CW", "CX",
    "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE", "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK",
    "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF", "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS",
    "GT", "GU", "GW", "GY", "HK", "HM", "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR",
    "IS", "IT", "JE", "JM", "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA",
    "LB", "LC", "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA", "NC", "NE",
    "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG", "PH", "PK", "PL", "PM",
    "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW", "SA", "SB", "SC", "SD", "SE", "SG",
    "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS", "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF",
    "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO", "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY",
    "UZ", "VA", "VC", "VE", "VG", "VI", "VN", "VU", "WF", "WS", "YE", "YT", "ZA", "ZM", "ZW",
})


@dataclass(frozen=True)
class SolicitudRegistro:
    user_id: str
    email: str
    nombre: str
    # Optional so registrations made before these fields existed stay valid.
    tipo_documento: str | None = None
    numero_documento: str | None = None
    pais: str | None = None
    metodo_pago: str | None = None


def normalizar_email(email: str) -> str:
    return email.strip().lower()


def normalizar_documento(numero: str) -> str:
    """Passport and ID numbers are not case-sensitive: 'ab123' and 'AB123' are one document."""
    return numero.strip().upper()


def email_sha256(email: str) -> str:
    """What marketing and conversiones compare for self-referral (AfiliadoRegistrado v3 carries it,
    AfiliadoHabilitado v2 passes it on): sha256 hex of the normalized address, never the address."""
    return hashlib.sha256(normalizar_email(email).encode()).hexdigest()


def es_desechable(dominio: str) -> bool:
    """A listed throw-away domain or any subdomain of one (`eu.mailinator.com`), never a lookalike
    (`notmailinator.com`, `mailinator.com.example.org`)."""
    etiquetas = dominio.strip(".").lower().split(".")
    return any(".".join(etiquetas[i:]) in DISPOSABLE_DOMAINS for i in range(len(etiquetas)))


def motivos_de_rechazo(solicitud: SolicitudRegistro, user_id_ya_validado: bool,
                       documento_duplicado: bool = False, email_duplicado: bool = False) -> list[str]:
    """The automatic validation rules; an empty list means the affiliate is valid.
    An email another affiliate holds is `cuenta_duplicada`, like a user id: one person, one account."""
    motivos = []
    email = normalizar_email(solicitud.email)
    if not EMAIL.match(email):
        motivos.append("email_invalido")
    elif es_desechable(email.rsplit("@", 1)[1]):
        motivos.append("email_desechable")
    if sum(ch.isalpha() for ch in solicitud.nombre) < 2:
        motivos.append("nombre_invalido")
    if user_id_ya_validado or email_duplicado:
        motivos.append("cuenta_duplicada")
    if documento_duplicado:
        motivos.append("documento_duplicado")
    return motivos


# -- what reads show of the personal data ---------------------------------------------------------------
def enmascarar_email(email: str) -> str:
    """For lists: `ana.perez@example.com` → `a***@e***.com`."""
    local, _, dominio = email.partition("@")
    nombre, punto, tld = dominio.rpartition(".")
    return f"{local[:1]}***@{nombre[:1]}***{punto}{tld}"


def enmascarar_documento(numero: str) -> str:
    """Never shown whole: at most its last 4 characters and never more than half of it."""
    visibles = min(4, len(numero) // 2)
    return "****" + (numero[-visibles:] if visibles else "")


# -- lifecycle after the automatic validation: actions taken by a human ---------------------
APROBAR = "aprobar"
SUSPENDER = "suspender"
REACTIVAR = "reactivar"

# action -> (the only state it applies to, the state it leads to)
TRANSICIONES = {
    APROBAR: (RECHAZADO, VALIDADO),     # a human overrides the automatic rejection
    SUSPENDER: (VALIDADO, SUSPENDIDO),
    REACTIVAR: (SUSPENDIDO, VALIDADO),
}


# Rejections for being someone who already has an account: overriding one gives a person a second account.
MOTIVOS_DE_DUPLICADO = frozenset({"cuenta_duplicada", "documento_duplicado"})
OPERADOR, ANUNCIANTE = "operador", "anunciante"


def may_override_rejection(rol: str, motivos: Sequence[str]) -> bool:
    """May a caller of role `rol` (operador, anunciante, afiliado) approve an affiliate the automatic
    validation rejected for `motivos`? A duplicate (an account or a document already held) only an
    operator may override; other rejections the operator or an advertiser; an affiliate never
    approves anyone, itself included."""
    if rol == OPERADOR:
        return True
    return rol == ANUNCIANTE and not (MOTIVOS_DE_DUPLICADO & set(motivos))


class TransicionInvalida(ValueError):
    """The action does not apply to the affiliate's current state."""


def siguiente_estado(estado: str, accion: str) -> str:
    desde, hacia = TRANSICIONES[accion]
    if estado != desde:
        raise TransicionInvalida(f"cannot {accion} an affiliate that is {estado}: only a {desde} one")
    return hacia
