"""Access at the HTTP edge: every route's rule (alpes/authorization.py) applied before it runs.

One dependency on every route finds the route's rule, authenticates the caller (API key, an
advertiser's signed request where the rule allows it, or the protected local mode), checks role
and scope, counts the request against its rate limits, and hands the route the `Principal`
(`caller: Caller`). What a principal may see or change inside an allowed route (its tenant) the
route's handlers decide. A route without a rule makes the service refuse to start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool

from .access import ANONYMOUS, Forbidden, Gate, Principal, Rule
from .proxies import client_ip

SIGNATURE_HEADER = "alpes-signature"
# A signed request's verifier: (raw body, the header's value) -> the advertiser it proves, or raises
# Unauthenticated. Given by the service that has signed routes (conversiones: postbacks).
SignedRequests = Callable[[bytes, str], Principal]
# (bucket, subject) -> RateLimited raised or None; kernel/ratelimit.py's limiter behind it.
Limits = Callable[[str, str], None]


@dataclass
class AccessControl:
    service: str
    rules: Mapping[tuple[str, str], Rule]
    gate: Gate
    signed_requests: SignedRequests | None = None
    limits: Limits | None = None
    # Per bucket, what is counted: "key" (the caller's key id) and/or "ip" (the client's address).
    limit_subjects: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # False when `limits` counts in this process only (no Redis): a public route's limit then
    # never blocks, so it runs on the event loop instead of paying a hop to the thread pool.
    limits_may_block: bool = True

    def rule_for(self, method: str, path: str) -> Rule:
        rule = self.rules.get(("GET" if method == "HEAD" else method, path))
        if rule is None:  # cannot happen past check_coverage; fail closed all the same
            raise Forbidden(f"no access rule for {method} {path}")
        return rule

    def check_coverage(self, app: FastAPI) -> None:
        """Every route has a rule and every rule a route: a new route cannot ship unguarded. (Read off
        the OpenAPI paths, which are the routes as served; routers are included without prefixes.)"""
        paths = get_openapi(title=app.title, version=app.version, routes=app.routes)["paths"]
        routes = {(method.upper(), path) for path, operations in paths.items() for method in operations}
        missing, stale = sorted(routes - set(self.rules)), sorted(set(self.rules) - routes)
        if missing or stale:
            raise RuntimeError(f"{self.service}: routes without an access rule {missing}; rules without a route {stale}")

    def describe(self) -> dict:
        anonymous = self.gate.anonymous_is_operator()
        return {"mode": "protected-local" if self.gate.protected_local else "required",
                "anonymous_is_operator": anonymous,
                "warning": "no API key exists yet: anonymous callers on loopback act as the operator; "
                           "create one with `alpes keys create --role operator`" if anonymous else None}


def _access(request: Request) -> AccessControl:
    return request.app.state.access


async def current_principal(request: Request) -> Principal:
    """The app-wide dependency (cached per request, so a route's `caller: Caller` is the same one)."""
    access = _access(request)
    scope = request.scope
    rule = access.rule_for(scope["method"], scope["route"].path)
    client = scope.get("client")
    address = client[0] if client else None
    signature = request.headers.get(SIGNATURE_HEADER)
    authorization = request.headers.get("authorization")
    signed = signature is not None and authorization is None and rule.signed and access.signed_requests is not None
    body = await request.body() if signed and not rule.public else None
    limits_never_block = rule.limit is None or access.limits is None or not access.limits_may_block
    if rule.public and limits_never_block:
        return _admit(access, rule, address, signature, authorization, body)
    # A key verified in the last second and limits counted in this process: nothing blocks.
    known = access.gate.remembered(authorization) if limits_never_block and body is None else None
    if known is not None:
        return _admit(access, rule, address, signature, authorization, body, known)
    # Authentication and the rate limits may each block (a key lookup, a Redis round trip): one hop
    # to the thread pool for all of them, not one each (a postback took three).
    return await run_in_threadpool(_admit, access, rule, address, signature, authorization, body)


def _admit(access: AccessControl, rule: Rule, address: str | None, signature: str | None,
           authorization: str | None, body: bytes | None, known: Principal | None = None) -> Principal:
    """`known`: the caller as Gate.remembered found it (no key lookup)."""
    if rule.public:
        principal = Principal(ANONYMOUS, ANONYMOUS, scopes=frozenset())
    elif known is not None:
        principal = known
    elif body is not None:
        principal = access.signed_requests(body, signature)
    else:
        # The key table is read at most once a second per key (Gate's cache).
        principal = access.gate.authenticate(authorization)
    if not rule.public:
        access.gate.authorize(rule, principal)
    if rule.limit is not None and access.limits is not None:
        subjects = access.limit_subjects.get(rule.limit, ("ip",))
        if "key" in subjects and principal.role != ANONYMOUS:
            access.limits(f"{rule.limit}:key", principal.id)
        if "ip" in subjects and address is not None and client_ip(address) is not None:
            access.limits(f"{rule.limit}:ip", address)
    return principal


Caller = Annotated[Principal, Depends(current_principal)]
