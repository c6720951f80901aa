"""The OpenAI API: chat and text completions dispatched by `model` to the engine serving that name, and
the model list.

Generation is vLLM's serving layer (each engine's `openai_serving_chat` / `openai_serving_completion`);
these routes pick the engine, hold a lease on it until the last byte is sent, cancel the engine request
when the client goes away, and say in response headers which checkpoint answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import listen_for_disconnect

from lape_awq.server.engine_observer import CURRENT_REQUEST, RequestObservation
from lape_awq.server.openai_errors import ApiError, error_response, from_vllm, lone_surrogate
from lape_awq.server.registry import Lease
from lape_awq.server.routes import registry_of, settings_of

log = logging.getLogger("lape_awq.server")
router = APIRouter()
T = TypeVar("T")


async def until_disconnect(work: Awaitable[T], request: Request) -> T | None:
    """Run `work`; a client that leaves first cancels it (and so aborts its engine request)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(listen_for_disconnect(request))
    done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        gone.cancel()
        return task.result()
    task.cancel()
    request.state.cancelled = True
    return None


async def leased_stream(
    stream: AsyncGenerator[str, None], lease: Lease, observation: RequestObservation
) -> AsyncIterator[str]:
    """`stream`, observed for the metrics; the lease is returned when it ends (or the client leaves)."""
    CURRENT_REQUEST.set(observation)  # this runs in the response task, where the engine is called
    try:
        async for chunk in stream:
            yield chunk
    finally:
        lease.release()
        await stream.aclose()  # vLLM's generator, and with it the engine request (aborted if unfinished)


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its stream however it ends. Starlette's leaves a stream whose
    send failed (a client gone or stalled, server/middleware.py) suspended until garbage collection; here
    its lease and engine request are given back at once."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def served_by(lease: Lease) -> dict[str, str]:
    """Which checkpoint answered (its public label): A/B users (and the swap tests) read it from every
    response."""
    return {
        "x-lape-awq-checkpoint": lease.engine.label,
        "x-lape-awq-quant-method": lease.engine.quant_method,
    }


async def generate(
    body: ChatCompletionRequest | CompletionRequest,
    request: Request,
    endpoint: Literal["chat", "completion"],
) -> Response:
    """Answer `body` with the engine serving its model: JSON, an SSE stream, an error, or 499."""
    registry = registry_of(request)
    name = body.model or registry.default_name()
    if not name:
        raise ApiError(400, "`model` is required: several models are served.", "model")
    body.model = name
    request.state.model = name
    bad_text = lone_surrogate(body.model_dump(exclude_unset=True))
    if bad_text is not None:
        raise ApiError(
            400,
            f"`{bad_text}` holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not "
            "text; send valid Unicode (pair the surrogates or drop them).",
            bad_text,
        )
    if settings_of(request).log_prompts:
        prompt = body.messages if endpoint == "chat" else body.prompt
        log.info(
            json.dumps(
                {"request_id": request.state.request_id, "model": name, "prompt": prompt},
                ensure_ascii=False,
                default=str,
            )
        )
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
            return error_response(from_vllm(result))
        if isinstance(result, BaseModel):
            return JSONResponse(result.model_dump(), headers=served_by(lease))
        streaming = True
        stream = leased_stream(result, lease, observation)
        return ClosingStreamingResponse(stream, media_type="text/event-stream", headers=served_by(lease))
    finally:
        if not streaming:
            lease.release()


# No docstrings on the route functions: FastAPI would publish them as OpenAPI descriptions.
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await generate(body, request, "chat")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await generate(body, request, "completion")


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": registry_of(request).describe()}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict:
    for row in registry_of(request).describe():
        if row["id"] == model:
            return row
    raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
