"""The FastAPI app: OpenAI routes dispatched by `model` to the engine serving that name, admin routes for
loading / swapping / unloading checkpoints, health and Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
from argparse import Namespace
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.exception_handling.handlers.http import http_exception_handler
from vllm.entrypoints.serve.exception_handling.handlers.validation import validation_exception_handler
from vllm.entrypoints.serve.utils.api_utils import listen_for_disconnect
from vllm.exceptions import VLLMError

from lape_awq.server.engine_observer import CURRENT_REQUEST, RequestObservation
from lape_awq.server.engines import EngineOptions, LoadError, start_engine
from lape_awq.server.metrics import ServerMetrics
from lape_awq.server.middleware import GatewayMiddleware
from lape_awq.server.openai_errors import ApiError, error_response
from lape_awq.server.registry import Lease, ModelRegistry

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


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")
    checkpoint: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


class SwapBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


def create_app(settings: ServerSettings, registry: ModelRegistry | None = None) -> FastAPI:
    """The server app; engines start in its lifespan (before the port opens) and stop at shutdown."""
    registry = registry or ModelRegistry(start_engine, settings.max_in_flight)

    def engine_snapshot():
        for slot in registry.slots.values():
            if slot.active is not None:
                engine = slot.active
                yield (slot.name, str(engine.checkpoint), slot.state, engine.in_flight,
                       engine.client.get_num_unfinished_requests())  # fmt: skip
        for engine in registry.draining:
            yield (engine.name, str(engine.checkpoint), "draining", engine.in_flight,
                   engine.client.get_num_unfinished_requests())  # fmt: skip

    metrics = ServerMetrics(engine_snapshot)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            for name, checkpoint in settings.models:
                log.info("loading %s from %s", name, checkpoint)
                await registry.load(name, checkpoint, settings.engine_options)
            yield
        finally:
            await registry.close()

    app = FastAPI(title="lape-awq", version="0.1.0", lifespan=lifespan)
    app.state.registry, app.state.metrics = registry, metrics
    # vLLM's handlers render validation and HTTP errors in OpenAI's shape (400 for a bad body); they read
    # this one flag. vLLM's engine-error handler is not used: it stops the whole server when one engine
    # fails, and here other engines keep serving.
    app.state.args = Namespace(log_error_stack=False)
    app.exception_handler(HTTPException)(http_exception_handler)
    app.exception_handler(RequestValidationError)(validation_exception_handler)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    async def any_error(request: Request, error: Exception) -> JSONResponse:
        """vLLM's mapping: its client errors (and ValueError / TypeError) are 400s, the rest 500."""
        body = create_error_response(error)
        if body.error.code >= 500:
            log.error("request %s failed", request.state.request_id, exc_info=error)
        return JSONResponse(body.model_dump(), status_code=body.error.code)

    # Named classes are answered inside the middleware stack (so access logs and metrics see the status);
    # a bare `Exception` handler is answered outside it, by Starlette's last-resort layer.
    for error_class in (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError, Exception):
        app.exception_handler(error_class)(any_error)

    app.add_middleware(
        GatewayMiddleware, settings=settings, metrics=metrics,
        known_model=lambda name: name in registry.slots,
    )  # fmt: skip

    async def until_disconnect(work, request: Request):
        """Run `work`; a client that leaves first cancels it (and so aborts its engine request)."""
        task, gone = asyncio.ensure_future(work), asyncio.ensure_future(listen_for_disconnect(request))
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            gone.cancel()
            return task.result()
        task.cancel()
        request.state.cancelled = True
        return None

    async def leased_stream(stream, lease: Lease, observation: RequestObservation):
        CURRENT_REQUEST.set(observation)  # this runs in the response task, where the engine is called
        try:
            async for chunk in stream:
                yield chunk
        finally:
            lease.release()

    def served_by(lease: Lease) -> dict[str, str]:
        """Which checkpoint answered: A/B users (and the swap tests) read it from every response."""
        return {"x-lape-awq-checkpoint": str(lease.engine.checkpoint),
                "x-lape-awq-quant-method": lease.engine.quant_method}  # fmt: skip

    async def generate(body, request: Request, endpoint: str) -> Response:
        name = body.model or registry.default_name()
        if not name:
            raise ApiError(400, "`model` is required: several models are served.", "model")
        body.model = name
        request.state.model = name
        if settings.log_prompts:
            prompt = body.messages if endpoint == "chat" else body.prompt
            log.info(json.dumps({"request_id": request.state.request_id, "model": name, "prompt": prompt},
                                ensure_ascii=False, default=str))  # fmt: skip
        lease = registry.lease(name)
        observation = RequestObservation(started=request.state.arrival)
        request.state.observation = observation
        streaming = False
        try:
            handler = getattr(lease.engine.state, f"openai_serving_{endpoint}")
            create = handler.create_chat_completion if endpoint == "chat" else handler.create_completion
            token = CURRENT_REQUEST.set(observation)
            try:
                result = await until_disconnect(create(body, request), request)
            finally:
                CURRENT_REQUEST.reset(token)
            if result is None:
                return Response(status_code=499)
            if isinstance(result, ErrorResponse):
                return JSONResponse(result.model_dump(), status_code=result.error.code)
            if isinstance(result, BaseModel):
                return JSONResponse(result.model_dump(), headers=served_by(lease))
            streaming = True
            stream = leased_stream(result, lease, observation)
            return StreamingResponse(stream, media_type="text/event-stream", headers=served_by(lease))
        finally:
            if not streaming:
                lease.release()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(body, request, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(body, request, "completion")

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": registry.describe()}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        for row in registry.describe():
            if row["id"] == model:
                return row
        raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

    @app.get("/health")
    async def health() -> JSONResponse:
        states = {row["id"]: row["state"] for row in registry.describe()}
        ok = bool(states) and all(state in ("ready", "swapping") for state in states.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models": states}, 200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def engine_options(updates: dict[str, Any]) -> EngineOptions:
        try:
            return settings.engine_options.with_updates(updates)
        except LoadError as error:
            raise ApiError(400, str(error), "options") from error

    def describe(name: str) -> dict:
        return next(row for row in registry.describe() if row["id"] == name)

    @app.get("/admin/models")
    async def admin_models() -> dict:
        draining = [
            {"id": old.name, "checkpoint": str(old.checkpoint), "in_flight": old.in_flight}
            for old in registry.draining
        ]
        return {"data": registry.describe(), "draining": draining}

    @app.post("/admin/models")
    async def admin_load(body: LoadBody) -> dict:
        try:
            await registry.load(body.name, Path(body.checkpoint), engine_options(body.options))
        except LoadError as error:
            message = f"loading {body.checkpoint} failed: {error}"
            raise ApiError(422, message, "checkpoint", "load_failed") from error
        return describe(body.name)

    @app.post("/admin/models/{name:path}/swap")
    async def admin_swap(name: str, body: SwapBody) -> dict:
        try:
            await registry.swap(name, Path(body.checkpoint), engine_options(body.options))
        except LoadError as error:
            raise ApiError(
                422, f"swapping `{name}` to {body.checkpoint} failed, the previous checkpoint keeps serving: "
                f"{error}", "checkpoint", "load_failed",
            ) from error  # fmt: skip
        return describe(name)

    @app.delete("/admin/models/{name:path}")
    async def admin_unload(name: str) -> dict:
        await registry.unload(name)
        return {"id": name, "deleted": True}

    return app
