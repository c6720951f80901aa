"""The server app: `ServerSettings` and `create_app`, which puts the shared state on `app.state` and adds
the error handlers, the gateway middleware (server/middleware.py) and the routers (server/routes/).
"""

from __future__ import annotations

import logging
from argparse import Namespace
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.exception_handling.handlers.http import http_exception_handler
from vllm.entrypoints.serve.exception_handling.handlers.validation import validation_exception_handler
from vllm.exceptions import VLLMError

from lape_awq.server.engines import EngineOptions, start_engine
from lape_awq.server.metrics import ServerMetrics
from lape_awq.server.middleware import GatewayMiddleware
from lape_awq.server.openai_errors import ApiError, error_response
from lape_awq.server.registry import ModelRegistry
from lape_awq.server.routes import admin, openai, ops, page

log = logging.getLogger("lape_awq.server")


@dataclass
class ServerSettings:
    """What `lape-awq serve` configures; `models` are loaded before the port opens."""

    models: list[tuple[str, Path]] = field(default_factory=list)
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    api_key: str | None = None
    admin_key: str | None = None
    max_body_bytes: int = 4 << 20
    max_in_flight: int = 256
    log_prompts: bool = False


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the configured models before the port opens; stop every engine at shutdown."""
    settings: ServerSettings = app.state.settings
    registry: ModelRegistry = app.state.registry
    try:
        for name, checkpoint in settings.models:
            log.info("loading %s from %s", name, checkpoint)
            await registry.load(name, checkpoint, settings.engine_options)
        yield
    finally:
        await registry.close()


async def api_error(_: Request, error: ApiError) -> JSONResponse:
    """The server's own refusals, in OpenAI's error shape."""
    return error_response(error)


async def any_error(request: Request, error: Exception) -> JSONResponse:
    """vLLM's mapping: its client errors (and ValueError / TypeError) are 400s, the rest 500."""
    body = create_error_response(error)
    if body.error.code >= 500:
        log.error("request %s failed", request.state.request_id, exc_info=error)
    return JSONResponse(body.model_dump(), status_code=body.error.code)


def create_app(settings: ServerSettings, registry: ModelRegistry | None = None) -> FastAPI:
    """The server app; engines start in its lifespan (before the port opens) and stop at shutdown."""
    registry = registry or ModelRegistry(start_engine, settings.max_in_flight)
    metrics = ServerMetrics(registry.engine_snapshot)
    app = FastAPI(title="lape-awq", version=metadata.version("lape-awq"), lifespan=lifespan)
    app.state.settings, app.state.registry, app.state.metrics = settings, registry, metrics
    # vLLM's handlers render validation and HTTP errors in OpenAI's shape (400 for a bad body); they read
    # this one flag. vLLM's engine-error handler is not used: it stops the whole server when one engine
    # fails, and here other engines keep serving.
    app.state.args = Namespace(log_error_stack=False)
    app.exception_handler(HTTPException)(http_exception_handler)
    app.exception_handler(RequestValidationError)(validation_exception_handler)
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
