"""HTTP mechanics shared by the services: app factory with lifespan, /health, error shape."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .runtime import ServiceRuntime


def create_app(title: str, runtime: ServiceRuntime, include: Callable[[FastAPI], None]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        runtime.start()
        try:
            yield
        finally:
            runtime.stop()

    app = FastAPI(title=title, lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        # One line per bad field: which field and why, nothing stored.
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p != "body"), "reason": e["msg"]}
                  for e in error.errors()]
        return JSONResponse(status_code=422, content={"detail": "invalid request", "errors": errors})

    app.add_exception_handler(Problem, problem_handler)

    @app.get("/health", tags=["ops"])
    def health() -> JSONResponse:
        report = runtime.health()
        return JSONResponse(status_code=200 if report["status"] == "ok" else 503, content=report)

    include(app)
    return app


class Problem(Exception):
    """A domain refusal answered as a 4xx naming the field and the reason."""

    def __init__(self, status: int, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.field = field
        self.reason = reason


def problem_handler(_request: Request, problem: Problem) -> JSONResponse:
    return JSONResponse(status_code=problem.status, content={
        "detail": problem.reason, "errors": [{"field": problem.field, "reason": problem.reason}]})
