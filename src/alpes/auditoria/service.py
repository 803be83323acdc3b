"""Composition root of the auditoria service: nothing here runs at import time."""

from __future__ import annotations

from alpes.composition import compose
from alpes.settings import Settings

from . import api, consumers, tables


def build(settings: Settings):
    return compose("auditoria", settings, outbox=tables.outbox, inbox=tables.inbox, keys=tables.claves_api,
                   consumers=consumers.consumer_specs(), routes=api.include_routes)
