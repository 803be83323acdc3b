"""Who may call what, in one visible place: one rule per route of every service.

A rule names the roles allowed and the scope their key needs; the route's handlers then keep each
caller to its own tenant (an advertiser to its campaigns and what hangs off them, an affiliate to
itself), answering 404 for anything of another tenant. A route missing here stops its service at
start-up, and tests/test_authorization_matrix.py tries every route as every kind of caller.
Nothing here runs anything; each service's composition root hands its table to the HTTP edge.
"""

from __future__ import annotations

from .kernel.access import ADVERTISER as ADV
from .kernel.access import AFFILIATE as AFF
from .kernel.access import OPERATOR as OP
from .kernel.access import Rule, allow, public

HEALTH = {("GET", "/health"): public(),
          # The events' AsyncAPI document, public like /openapi.json (alpes/asyncapi.py).
          ("GET", "/asyncapi.json"): public(),
          # Prometheus scrapes with an operator key (README "Metrics"); figures of the whole platform.
          ("GET", "/metrics"): allow(OP, scope="sistema:read")}

RULES: dict[str, dict[tuple[str, str], Rule]] = {
    "afiliados": {
        **HEALTH,
        # Registered by an operator or by an advertiser onboarding them (no public self-signup).
        ("POST", "/afiliados"): allow(OP, ADV, scope="afiliados:write"),
        # Advertisers: the affiliates they registered or that joined their programs; affiliates: themselves.
        ("GET", "/afiliados"): allow(OP, ADV, AFF, scope="afiliados:read"),
        ("GET", "/afiliados/{afiliado_id}"): allow(OP, ADV, AFF, scope="afiliados:read"),
        # Advertisers: only the affiliates they registered (any other: 404); a duplicate only an operator.
        ("POST", "/afiliados/{afiliado_id}/aprobar"): allow(OP, ADV, scope="afiliados:write"),
        ("POST", "/afiliados/{afiliado_id}/suspender"): allow(OP, ADV, scope="afiliados:write"),
        ("POST", "/afiliados/{afiliado_id}/reactivar"): allow(OP, ADV, scope="afiliados:write"),
        ("DELETE", "/afiliados/{afiliado_id}/datos-personales"): allow(OP, scope="afiliados:write"),
        # The catalogue: affiliates see the programs they may join, advertisers their own.
        ("GET", "/programas"): allow(OP, ADV, AFF, scope="campanas:read"),
    },
    "conversiones": {
        **HEALTH,
        ("GET", "/r/{link_code}"): public(limit="clicks"),
        # Advertisers post for their own campaigns, with a key or a signed request.
        ("POST", "/conversiones"): allow(OP, ADV, scope="conversiones:write", signed=True, limit="postbacks"),
        ("GET", "/conversiones"): allow(OP, ADV, AFF, scope="conversiones:read"),
        ("GET", "/conversiones/cifras"): allow(OP, ADV, AFF, scope="conversiones:read"),
        ("GET", "/conversiones/{conversion_id}"): allow(OP, ADV, AFF, scope="conversiones:read"),
        ("POST", "/conversiones/{conversion_id}/reembolso"): allow(OP, ADV, scope="conversiones:write", signed=True,
                                                                   limit="postbacks"),
        ("POST", "/conversiones/{conversion_id}/aprobar"): allow(OP, ADV, scope="conversiones:write"),
        ("POST", "/conversiones/{conversion_id}/rechazar"): allow(OP, ADV, scope="conversiones:write"),
        # The stream carries customer data (user id, address): not for affiliates.
        ("GET", "/conversiones/{conversion_id}/eventos"): allow(OP, ADV, scope="conversiones:read"),
        ("GET", "/sagas"): allow(OP, ADV, scope="conversiones:read"),
        ("GET", "/sagas/{correlation_id}"): allow(OP, ADV, scope="conversiones:read"),
    },
    "marketing": {
        **HEALTH,
        ("POST", "/claves"): allow(OP, ADV, scope="claves:write"),
        ("GET", "/claves"): allow(OP, ADV, scope="claves:read"),
        ("DELETE", "/claves/{key_id}"): allow(OP, ADV, scope="claves:write"),
        # Advertisers: registered by operators; an advertiser reads and updates itself only.
        ("POST", "/anunciantes"): allow(OP, scope="campanas:write"),
        ("GET", "/anunciantes"): allow(OP, ADV, scope="campanas:read"),
        ("GET", "/anunciantes/{anunciante_id}"): allow(OP, ADV, scope="campanas:read"),
        ("PUT", "/anunciantes/{anunciante_id}"): allow(OP, ADV, scope="campanas:write"),
        ("POST", "/anunciantes/{anunciante_id}/secreto-postback"): allow(OP, ADV, scope="claves:write"),
        ("POST", "/campanas"): allow(OP, ADV, scope="campanas:write"),
        # Affiliates: the campaigns they are enrolled in.
        ("GET", "/campanas"): allow(OP, ADV, AFF, scope="campanas:read"),
        ("GET", "/campanas/{campana_id}"): allow(OP, ADV, AFF, scope="campanas:read"),
        # The terms that may change while it runs: an advertiser its own campaigns (any other: 404).
        ("PUT", "/campanas/{campana_id}"): allow(OP, ADV, scope="campanas:write"),
        ("POST", "/campanas/{campana_id}/activar"): allow(OP, ADV, scope="campanas:write"),
        ("POST", "/campanas/{campana_id}/pausar"): allow(OP, ADV, scope="campanas:write"),
        ("POST", "/campanas/{campana_id}/finalizar"): allow(OP, ADV, scope="campanas:write"),
        ("POST", "/campanas/{campana_id}/inscripciones"): allow(OP, ADV, scope="campanas:write"),
        # Affiliates: their own enrollment (its tracking link) only.
        ("GET", "/campanas/{campana_id}/inscripciones"): allow(OP, ADV, AFF, scope="campanas:read"),
        ("PUT", "/campanas/{campana_id}/reglas"): allow(OP, ADV, scope="campanas:write"),
        ("GET", "/campanas/{campana_id}/reglas"): allow(OP, ADV, AFF, scope="campanas:read"),
        ("GET", "/comisiones"): allow(OP, ADV, AFF, scope="comisiones:read"),
        ("GET", "/comisiones/{comision_id}"): allow(OP, ADV, AFF, scope="comisiones:read"),
        ("GET", "/comisiones/{comision_id}/explain"): allow(OP, ADV, AFF, scope="comisiones:read"),
        ("GET", "/reportes"): allow(OP, ADV, AFF, scope="reportes:read"),
        ("GET", "/reportes/campanas/{campana_id}"): allow(OP, ADV, scope="reportes:read"),
        ("GET", "/reportes/afiliados/{afiliado_id}"): allow(OP, ADV, AFF, scope="reportes:read"),
        ("GET", "/pagos/saldos"): allow(OP, ADV, AFF, scope="pagos:read"),
        ("GET", "/pagos/ledger"): allow(OP, ADV, AFF, scope="pagos:read"),
        ("POST", "/pagos"): allow(OP, ADV, scope="pagos:write"),
        ("GET", "/pagos"): allow(OP, ADV, AFF, scope="pagos:read"),
        ("GET", "/pagos/{pago_id}"): allow(OP, ADV, AFF, scope="pagos:read"),
        ("POST", "/pagos/{pago_id}/pagar"): allow(OP, ADV, scope="pagos:write"),
        # Webhook endpoints: advertisers and affiliates manage their own (another's id: 404), the
        # operator every one; an operator's own endpoint receives every tenant's events.
        ("POST", "/webhooks"): allow(OP, ADV, AFF, scope="webhooks:write"),
        ("GET", "/webhooks"): allow(OP, ADV, AFF, scope="webhooks:read"),
        ("GET", "/webhooks/{webhook_id}"): allow(OP, ADV, AFF, scope="webhooks:read"),
        ("PUT", "/webhooks/{webhook_id}"): allow(OP, ADV, AFF, scope="webhooks:write"),
        ("DELETE", "/webhooks/{webhook_id}"): allow(OP, ADV, AFF, scope="webhooks:write"),
        ("POST", "/webhooks/{webhook_id}/secreto"): allow(OP, ADV, AFF, scope="webhooks:write"),
        ("POST", "/webhooks/{webhook_id}/habilitar"): allow(OP, ADV, AFF, scope="webhooks:write"),
        ("GET", "/webhooks/{webhook_id}/entregas"): allow(OP, ADV, AFF, scope="webhooks:read"),
        ("POST", "/webhooks/{webhook_id}/entregas/{entrega_id}/reenviar"): allow(OP, ADV, AFF,
                                                                                  scope="webhooks:write"),
    },
    "auditoria": {
        **HEALTH,
        # Advertisers: the records of their own aggregates (campaigns, their conversions, themselves);
        # affiliates: none. Filters by actor (actor_id, actor_role).
        ("GET", "/auditoria/eventos"): allow(OP, ADV, scope="auditoria:read"),
        ("GET", "/auditoria/verificacion"): allow(OP, scope="auditoria:read"),
        ("GET", "/auditoria/hallazgos"): allow(OP, scope="auditoria:read"),
        ("GET", "/sistema/servicios"): allow(OP, scope="sistema:read"),
        ("GET", "/sistema/alertas"): allow(OP, scope="sistema:read"),
    },
}

# Rate-limit buckets and what each counts (README "Access"): per key and per client address.
LIMIT_SUBJECTS: dict[str, tuple[str, ...]] = {"postbacks": ("key", "ip"), "clicks": ("ip",)}

# -- the web console (alpes/consola): which roles may open each page ------------------------------
# The console is not a service: each page calls the services with the signed-in user's own key, so
# the services' rules above still decide what it may see and do; these keep a role off pages that are
# not for it (403 page). No roles: public. A console route missing here stops the console at start-up.
CONSOLE_PAGES: dict[tuple[str, str], tuple[str, ...]] = {
    ("GET", "/health"): (),
    ("GET", "/entrar"): (),
    ("POST", "/entrar"): (),
    ("GET", "/"): (OP, ADV, AFF),
    ("POST", "/salir"): (OP, ADV, AFF),
    # Operator pages (consola/pages_operator.py).
    ("GET", "/operador"): (OP,),
    ("GET", "/operador/topicos"): (OP,),
    ("GET", "/operador/auditoria"): (OP,),
    ("GET", "/operador/claves"): (OP,),
    ("POST", "/operador/claves"): (OP,),
    ("POST", "/operador/claves/{key_id}/revocar"): (OP,),
    # The live event stream (consola/live.py): auditoria's records, as the user's key may read them.
    ("GET", "/eventos"): (OP, ADV),
    ("GET", "/eventos/stream"): (OP, ADV),
    # The advertiser's pages (consola/pages_advertiser.py); operators open them too and see every tenant.
    ("GET", "/anunciante"): (OP, ADV),
    ("GET", "/anunciante/campanas"): (OP, ADV),
    ("POST", "/anunciante/campanas"): (OP, ADV),
    ("GET", "/anunciante/campanas/{campana_id}"): (OP, ADV),
    ("POST", "/anunciante/campanas/{campana_id}/estado"): (OP, ADV),
    ("POST", "/anunciante/campanas/{campana_id}/reglas"): (OP, ADV),
    ("POST", "/anunciante/campanas/{campana_id}/terminos"): (OP, ADV),
    ("POST", "/anunciante/campanas/{campana_id}/inscripciones"): (OP, ADV),
    ("GET", "/anunciante/afiliados"): (OP, ADV),
    ("POST", "/anunciante/afiliados"): (OP, ADV),
    ("POST", "/anunciante/afiliados/{afiliado_id}/estado"): (OP, ADV),
    ("GET", "/anunciante/revision"): (OP, ADV),
    ("POST", "/anunciante/revision/{conversion_id}/aprobar"): (OP, ADV),
    ("POST", "/anunciante/revision/{conversion_id}/rechazar"): (OP, ADV),
    ("GET", "/anunciante/conversiones"): (OP, ADV),
    ("GET", "/anunciante/conversiones/{conversion_id}"): (OP, ADV),
    ("GET", "/anunciante/pagos"): (OP, ADV),
    ("POST", "/anunciante/pagos"): (OP, ADV),
    ("GET", "/anunciante/pagos/{pago_id}"): (OP, ADV),
    ("POST", "/anunciante/pagos/{pago_id}/pagar"): (OP, ADV),
    ("GET", "/anunciante/reportes"): (OP, ADV),
    ("GET", "/anunciante/reportes/datos"): (OP, ADV),
    ("GET", "/anunciante/reportes.csv"): (OP, ADV),
    # The affiliate portal (consola/pages_affiliate.py).
    ("GET", "/afiliado"): (AFF,),
}
