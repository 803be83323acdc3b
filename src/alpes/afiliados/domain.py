"""Afiliados: partners who register, get validated, and earn commissions."""

from __future__ import annotations

import re
from dataclasses import dataclass

REGISTRADO = "registrado"
VALIDADO = "validado"
RECHAZADO = "rechazado"

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")

# Throw-away inbox providers: a partner paid real money must be reachable.
DISPOSABLE_DOMAINS = frozenset({
    "mailinator.com", "guerrillamail.com", "10minutemail.com", "tempmail.com", "temp-mail.org",
    "yopmail.com", "trashmail.com", "sharklasers.com", "getnada.com", "dispostable.com",
})


@dataclass(frozen=True)
class SolicitudRegistro:
    user_id: str
    email: str
    nombre: str


def normalizar_email(email: str) -> str:
    return email.strip().lower()


def motivos_de_rechazo(solicitud: SolicitudRegistro, user_id_ya_validado: bool) -> list[str]:
    """The automatic validation rules; an empty list means the affiliate is valid."""
    motivos = []
    email = normalizar_email(solicitud.email)
    if not EMAIL.match(email):
        motivos.append("email_invalido")
    elif email.rsplit("@", 1)[1] in DISPOSABLE_DOMAINS:
        motivos.append("email_desechable")
    if sum(ch.isalpha() for ch in solicitud.nombre) < 2:
        motivos.append("nombre_invalido")
    if user_id_ya_validado:
        motivos.append("cuenta_duplicada")
    return motivos
