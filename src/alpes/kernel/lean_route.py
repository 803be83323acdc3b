"""A FastAPI route that answers with less CPU per request (issue 11: the hottest routes).

`LeanRoute` is an `APIRoute`: declared, documented in /openapi.json and matched by the router
exactly as any other, with the same rule in alpes/authorization.py. Only its request handler
differs. FastAPI's generic one solves a dependency graph per request (cache keys, the four kinds
of parameters of every dependant, a response object, background tasks) and runs a sync route's
response validation in a second hop to the thread pool: about half of the HTTP edge's CPU on
POST /conversiones. The one here is planned once per route from the same `Dependant` and does,
in FastAPI's order and with FastAPI's own functions for each step (so the same values and the same
422 errors):

1. read the body and parse JSON (a broken body: the same `json_invalid` error, before anything);
2. the caller: the app-wide access dependency (`current_principal`), once;
3. the path, query, header and cookie parameters, then the body, validated (errors together);
4. the endpoint (a sync one in the thread pool, once), and its answer serialized as FastAPI does.

A route whose dependant needs more than that (other dependencies, BackgroundTasks, a Response
parameter, security scopes, streaming answers, forms) keeps FastAPI's handler: nothing is lost.

It calls FastAPI's internal helpers (those its handler calls); tests/test_http_edge.py sends the
same good and bad requests to conversiones built with LeanRoute and with FastAPI's APIRoute and
requires the same answers, so a FastAPI release that changes them fails there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi._compat import field_annotation_is_sequence
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.models import _is_coroutine_callable
from fastapi.dependencies.utils import (_get_param_aliases, _get_param_model, _is_json_field,
                                        _validate_value_with_model_field, request_body_to_args,
                                        request_params_to_args)
from fastapi.exceptions import RequestValidationError
from fastapi.params import Form
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, _effective_route_context_var, serialize_response
from fastapi.utils import is_body_allowed_for_status_code
from pydantic_core import PydanticUndefined as Undefined
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .http_access import current_principal

# The JSON the edge (kernel/http.py's Edge) already parsed to check it, handed on in the scope so
# the route does not parse the same body twice.
PARSED_BODY = "alpes.parsed_body"

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class LeanRoute(APIRoute):
    """An APIRoute whose handler is planned once (module docstring); FastAPI's when it cannot be."""

    def get_route_handler(self) -> Handler:
        # The route as included (app-wide dependencies added), as APIRoute.get_route_handler reads it.
        route: Any = self
        context = _effective_route_context_var.get()
        if context is not None and context.original_route is self:
            route = context
        return lean_handler(route) or super().get_route_handler()


def lean_handler(route: Any) -> Handler | None:
    """The lean handler of `route` (an APIRoute or FastAPI's included-route context), or None when
    its dependant needs what only FastAPI's generic handler does."""
    dependant = route.dependant
    if not _plain(dependant) or route.stream_item_field is not None or getattr(route, "is_json_stream", False):
        return None
    body_field = route.body_field
    if body_field is not None and isinstance(body_field.field_info, Form):
        return None
    # The caller's dependency: the access rules' (kernel/http_access.py), whatever name it is given.
    caller_names = [d.name for d in dependant.dependencies if d.name is not None]
    needs_caller = bool(dependant.dependencies)
    response_class = route.response_class
    default_class = isinstance(response_class, DefaultPlaceholder)
    actual_class = response_class.value if default_class else response_class
    if not issubclass(actual_class, JSONResponse if default_class else Response):
        return None
    response_field = route.response_field
    use_dump_json = response_field is not None and default_class
    status_code = route.status_code
    strict_content_type = route.strict_content_type
    if isinstance(strict_content_type, DefaultPlaceholder):
        strict_content_type = strict_content_type.value
    endpoint = dependant.call
    is_coroutine = _is_coroutine_callable(endpoint)
    param_groups = [([_planned(f) for f in fields], reader) for fields, reader in (
        (dependant.path_params, _path_params), (dependant.query_params, _query_params),
        (dependant.header_params, _headers), (dependant.cookie_params, _cookies)) if fields]
    body_params = dependant.body_params
    embed = route._embed_body_fields
    request_name = dependant.request_param_name
    serialize = dict(include=route.response_model_include, exclude=route.response_model_exclude,
                     by_alias=route.response_model_by_alias, exclude_unset=route.response_model_exclude_unset,
                     exclude_defaults=route.response_model_exclude_defaults,
                     exclude_none=route.response_model_exclude_none)

    async def handle(request: Request) -> Response:
        body: Any = Undefined
        if body_field is not None:
            body = await _json_body(request, strict_content_type)
        values: dict[str, Any] = {}
        if needs_caller:
            caller = await current_principal(request)
            for name in caller_names:
                values[name] = caller
        errors: list[Any] = []
        for fields, reader in param_groups:
            received = reader(request)
            for field, keys, optional, default, simple, where in fields:
                key = next((k for k in keys if k in received), None)
                if key is None and optional:
                    values[field.name] = default  # absent and optional: what FastAPI would give
                    continue
                if not simple:
                    found, wrong = request_params_to_args([field], received)
                    values.update(found)
                    errors += wrong
                    continue
                # FastAPI's request_params_to_args for one plain value, its per-request checks planned.
                key = keys[0] if key is None else key
                value = received.get(key)
                found, wrong = _validate_value_with_model_field(
                    field=field, value=Undefined if value is None else value, values=values, loc=(where, key))
                if wrong:
                    errors += wrong
                else:
                    values[field.name] = found
        if body_params:
            found, wrong = await request_body_to_args(body_fields=body_params, received_body=body,
                                                      embed_body_fields=embed)
            values.update(found)
            errors += wrong
        if errors:
            raise RequestValidationError(errors, body=None if body is Undefined else body)
        if request_name:
            values[request_name] = request
        answer = await endpoint(**values) if is_coroutine else await run_in_threadpool(endpoint, **values)
        if isinstance(answer, Response):
            return answer
        # A dict checked against the declared return type is microseconds: on the loop, not a
        # second hop to the thread pool as FastAPI does for a sync route.
        content = await serialize_response(field=response_field, response_content=answer, is_coroutine=True,
                                           dump_json=use_dump_json, **serialize)
        response = (Response(content=content, media_type="application/json", status_code=status_code or 200)
                    if use_dump_json else
                    actual_class(content, **({"status_code": status_code} if status_code else {})))
        if not is_body_allowed_for_status_code(response.status_code):
            response.body = b""
        return response
    return handle


def _planned(field) -> tuple:
    """What FastAPI's request_params_to_args works out about a parameter on every request, once:
    (field, the request keys it is looked up by, whether an absent value takes the default without
    validation (optional, not validate_default, an immutable default) and that default, whether it
    is one plain value (not a sequence, a model of parameters or Json: then FastAPI's own function
    reads it), where it comes from). Most of a click's and a postback's parameter CPU (issue 11)."""
    info = field.field_info
    keys = tuple(key for _, key in _get_param_aliases(field))
    simple = (_get_param_model(field) is None and not field_annotation_is_sequence(info.annotation)
              and not _is_json_field(field))
    optional = (simple and not info.is_required() and not info.validate_default
                and isinstance(field.default, (type(None), str, int, float, bool)))
    return field, keys, optional, field.default if optional else None, simple, info.in_.value


def _plain(dependant) -> bool:
    """Only parameters, the Request and the access dependency (itself taking only the Request)."""
    if (dependant.websocket_param_name or dependant.http_connection_param_name or dependant.response_param_name
            or dependant.background_tasks_param_name or dependant.security_scopes_param_name):
        return False
    for sub in dependant.dependencies:
        if sub.call is not current_principal or sub.dependencies or sub.path_params or sub.query_params \
                or sub.header_params or sub.cookie_params or sub.body_params:
            return False
    return True


async def _json_body(request: Request, strict_content_type: bool) -> Any:
    """The body as FastAPI's handler reads it: JSON when the content type says so (or says nothing
    and the route is not strict), else the bytes; Undefined when empty."""
    body = await request.body()
    if not body:
        return Undefined
    content_type = request.headers.get("content-type")
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        main, _, sub = media.partition("/")
        if main != "application" or "/" in sub or not (sub == "json" or sub.endswith("+json")):
            return body
    elif strict_content_type:
        return body
    parsed = request.scope.get(PARSED_BODY, Undefined)
    if parsed is not Undefined:
        return parsed
    try:
        return json.loads(body)
    except json.JSONDecodeError as error:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", error.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": error.msg}}], body=error.doc) from error
    except Exception as error:  # as FastAPI: our handler turns it into 422 naming `body`
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from error


def _path_params(request: Request):
    return request.path_params


def _query_params(request: Request):
    return request.query_params


def _headers(request: Request):
    return request.headers


def _cookies(request: Request):
    return request.cookies


