"""The server app: `ServerSettings` and `create_app`, which puts the shared state on `app.state` and adds
the error handlers, the gateway middleware (server/middleware.py) and the routers (server/routes/).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import metadata
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.exceptions import VLLMError

from lape_awq.server.checkpoint_roots import CheckpointRoots
from lape_awq.server.engines import EngineOptions, start_engine
from lape_awq.server.metrics import ServerMetrics
from lape_awq.server.middleware import GatewayMiddleware
from lape_awq.server.openai_errors import ApiError, error_response, from_vllm, validation_error
from lape_awq.server.registry import ModelRegistry
from lape_awq.server.routes import admin, openai, ops, page

log = logging.getLogger("lape_awq.server")


@dataclass
class ServerSettings:
    """What `lape-awq serve` configures; `models` are loaded before the port opens. `checkpoint_roots`:
    where admin loads may come from (server/checkpoint_roots.py). `send_timeout`: seconds a response may
    wait on a client that does not read before its request is cancelled. `open_ops`: /metrics and
    /openapi.json answer without a key even when `api_key` is set."""

    models: list[tuple[str, Path]] = field(default_factory=list)
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    api_key: str | None = None
    admin_key: str | None = None
    max_body_bytes: int = 4 << 20
    max_in_flight: int = 256
    log_prompts: bool = False
    checkpoint_roots: CheckpointRoots = field(default_factory=lambda: CheckpointRoots(()))
    send_timeout: float = 60.0
    open_ops: bool = False
    restart_dead: bool = False


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the configured models before the port opens; watch for dead engines while serving; stop every
    engine at shutdown."""
    settings: ServerSettings = app.state.settings
    registry: ModelRegistry = app.state.registry
    watchdog = asyncio.create_task(registry.watch())
    try:
        for name, checkpoint in settings.models:
            log.info("loading %s from %s", name, checkpoint)
            await registry.load(name, checkpoint, settings.engine_options)
        yield
    finally:
        watchdog.cancel()
        await registry.close()


async def api_error(_: Request, error: ApiError) -> JSONResponse:
    """The server's own refusals, in OpenAI's error shape."""
    return error_response(error)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """The framework's refusals (unknown route, wrong method, a missing static file) in the same shape."""
    generic = str(error.detail) == HTTPStatus(error.status_code).phrase  # the router's, not a route's own
    if error.status_code == 404 and generic:
        message = f"There is no {request.method} {request.url.path} here (the API is under /v1)."
    elif error.status_code == 405 and generic:
        allowed = {k.lower(): v for k, v in (error.headers or {}).items()}.get("allow", "")
        message = (
            f"{request.url.path} does not take {request.method} (it takes {allowed or 'other methods'})."
        )
    else:
        message = str(error.detail)
    return error_response(ApiError(error.status_code, message), headers=error.headers)


async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
    """A body that is not JSON, not an object, or has wrong fields: 400 naming what to fix."""
    return error_response(validation_error(list(error.errors())))


async def any_error(request: Request, error: Exception) -> JSONResponse:
    """vLLM's mapping: its client errors (and ValueError / TypeError) are 400s, the rest 500."""
    refusal = from_vllm(create_error_response(error))
    if refusal.status >= 500:
        log.error("request %s failed", request.state.request_id, exc_info=error)
    return error_response(refusal)


def create_app(settings: ServerSettings, registry: ModelRegistry | None = None) -> FastAPI:
    """The server app; engines start in its lifespan (before the port opens) and stop at shutdown."""
    registry = registry or ModelRegistry(
        start_engine,
        settings.max_in_flight,
        roots=settings.checkpoint_roots,
        restart_dead=settings.restart_dead,
    )
    metrics = ServerMetrics(registry.engine_snapshot)
    registry.on_death = metrics.count_engine_death
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and this server and its users are
    # often offline. The OpenAPI document stays (/openapi.json).
    app = FastAPI(
        title="lape-awq",
        version=metadata.version("lape-awq"),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings, app.state.registry, app.state.metrics = settings, registry, metrics
    # vLLM's engine-error handler is not used: it stops the whole server when one engine fails, and here
    # other engines keep serving.
    app.exception_handler(HTTPException)(http_error)
    app.exception_handler(RequestValidationError)(invalid_request)
    app.exception_handler(ApiError)(api_error)
    # Named classes are answered inside the middleware stack (so access logs and metrics see the status);
    # a bare `Exception` handler is answered outside it, by Starlette's last-resort layer.
    for error_class in (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError, Exception):
        app.exception_handler(error_class)(any_error)

    app.add_middleware(
        GatewayMiddleware,
        settings=settings,
        metrics=metrics,
        known_model=lambda name: name in registry.slots,
    )
    # This order is the routes' matching order and the order of the OpenAPI document's paths.
    for routes in (openai, ops, admin, page):
        app.include_router(routes.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app
