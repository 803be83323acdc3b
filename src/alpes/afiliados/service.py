"""Composition root of the afiliados service: nothing here runs at import time."""

from __future__ import annotations

from alpes.composition import compose
from alpes.kernel.runtime import PeriodicJob, ServiceRuntime
from alpes.settings import Settings

from . import api, consumers, handlers, pii, tables


def build(settings: Settings):
    # The affiliates' data keys, wrapped with the master keys of the settings (pii.py).
    vault = pii.Vault(pii.MasterKeys(settings.pii_keys()), tables.claves)

    def configure(runtime: ServiceRuntime) -> None:
        vault.load_index_key(runtime.db)
        # Rows and events written in clear before migration 0004: sealed before the service serves,
        # and again periodically (rows an older instance writes during a rolling upgrade).
        def seal() -> int:
            return handlers.seal_personal_data(runtime.db, vault, runtime.registry)

        while seal():
            pass
        runtime.jobs.append(PeriodicJob("seal-personal-data", 5.0, seal))
        runtime.jobs.append(PeriodicJob("validate-afiliados", 0.2, lambda: handlers.validate_registered_afiliados(
            runtime.db, runtime.outbox, vault)))

    app, runtime = compose("afiliados", settings, outbox=tables.outbox, inbox=tables.inbox, keys=tables.claves_api,
                           consumers=consumers.consumer_specs(),
                           routes=lambda runtime: api.include_routes(runtime, vault), configure=configure)
    app.state.pii_vault = vault
    return app, runtime
