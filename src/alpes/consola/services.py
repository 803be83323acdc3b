"""The four services' HTTP APIs, called with the signed-in user's key.

The console holds no data of its own: every page is what the services answer to this user's key,
so every rule they enforce (roles, scopes, tenants, rate limits) holds in the console too. One
pooled `httpx.AsyncClient` per console process; a `Services` binds it to one session's key.
State changes go as JSON (or with no body) and without an Origin header, as the services require
of server callers (kernel/http.py refuses form posts and foreign origins).
"""

from __future__ import annotations

from typing import Any

import httpx

from ..contract import SERVICES
from ..settings import Settings


class ServiceError(Exception):
    """A service refused or could not be reached: its status, its reason, the fields it named."""

    def __init__(self, service: str, status: int, detail: str, errors: list[dict] | None = None) -> None:
        super().__init__(f"{service}: {status} {detail}")
        self.service = service
        self.status = status
        self.detail = detail
        self.errors = errors or []

    def field_reasons(self) -> dict[str, str]:
        """{field: reason} of the fields the service named (a form shows each beside its input)."""
        return {e.get("field") or "": e.get("reason", "") for e in self.errors}

    def message(self) -> str:
        if not self.errors:
            return self.detail
        return "; ".join(f"{e.get('field')}: {e.get('reason')}" if e.get("field") else str(e.get("reason"))
                         for e in self.errors)


def service_urls(settings: Settings) -> dict[str, str]:
    """Base URL of each service (instance 0) as the console reaches it: ALPES_CONSOLA_SERVICES_HOST
    (where `{service}` stands for each service's name: `{service}` alone for Compose or Kubernetes
    service names) or ALPES_HOST, and each service's port."""
    urls = {}
    for name in SERVICES:
        host = (settings.consola_services_host or settings.host).replace("{service}", name)
        if host in ("0.0.0.0", "::"):  # a wildcard bind is not an address to call
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        urls[name] = f"http://{host}:{settings.port(name)}"
    return urls


class Services:
    """The services as one user sees them (their key; None: anonymous, the protected local mode)."""

    def __init__(self, client: httpx.AsyncClient, urls: dict[str, str], key: str | None,
                 request_id: str | None = None) -> None:
        self.client = client
        self.urls = urls
        self.key = key
        self.request_id = request_id

    def _headers(self) -> dict[str, str]:
        headers = {"accept": "application/json"}
        if self.key is not None:
            headers["authorization"] = f"Bearer {self.key}"
        return headers

    async def request(self, method: str, service: str, path: str, *, params: dict | None = None,
                      json: Any = None, expect_json: bool = True) -> Any:
        if service not in self.urls:
            raise ValueError(f"unknown service {service!r}")
        url = self.urls[service] + path
        clean = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        try:
            response = await self.client.request(method, url, params=clean or None, json=json,
                                                 headers=self._headers())
        except httpx.TimeoutException:
            raise ServiceError(service, 504, f"{service} did not answer in time") from None
        except httpx.HTTPError as error:
            raise ServiceError(service, 503, f"{service} is unreachable ({type(error).__name__})") from None
        if response.status_code >= 400:
            detail, errors = f"{service} answered {response.status_code}", []
            try:
                body = response.json()
                errors = body.get("errors") or []
                detail = str(body.get("detail") or detail)
            except ValueError:
                pass
            raise ServiceError(service, response.status_code, detail, errors)
        if not expect_json:
            return response.text
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ServiceError(service, 502, f"{service} answered something that is not JSON") from None

    async def get(self, service: str, path: str, params: dict | None = None) -> Any:
        return await self.request("GET", service, path, params=params)

    async def post(self, service: str, path: str, json: Any = None, params: dict | None = None) -> Any:
        return await self.request("POST", service, path, json=json, params=params)

    async def put(self, service: str, path: str, json: Any = None) -> Any:
        return await self.request("PUT", service, path, json=json)

    async def delete(self, service: str, path: str) -> Any:
        return await self.request("DELETE", service, path)

    async def health(self, service: str) -> tuple[int, dict]:
        """A service's /health as it is, degraded (503) included: (status, report); (0, {}) unreachable."""
        try:
            response = await self.client.get(self.urls[service] + "/health", headers=self._headers())
            return response.status_code, response.json()
        except (httpx.HTTPError, ValueError):
            return 0, {}
