"""The ASGI layer in front of every route: API keys, the request body limit, the send timeout, access logs
and metrics.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers streaming responses and hides client
disconnects; here a stream that ends without its final body message is a cancelled request.

Which routes need a key, when the server has one (`--api-key`): /v1 (the API key, or the admin key),
/admin (the admin key), /metrics and /openapi.json (either key, unless `--open-ops`). Public: /health (for
load balancers: names and states only), the chat page and its files (the page calls the API with the key
its user types).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lape_awq.server.metrics import UNKNOWN_MODEL, ServerMetrics
from lape_awq.server.openai_errors import error_body

if TYPE_CHECKING:
    from lape_awq.server.app import ServerSettings

access_log = logging.getLogger("lape_awq.access")
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
OPS_ROUTES = ("/metrics", "/openapi.json")


class _BodyTooLarge(Exception):
    pass


class ClientStalled(OSError):
    """The client stopped reading: a response message could not be sent within the send timeout. An
    OSError, so that Starlette's streaming response treats it as the disconnect it is."""


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    value = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _key_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class GatewayMiddleware:
    """Auth for /v1 (API key) and /admin (admin key), body limit (413), a request id (x-request-id), and
    per request one access-log line and the request metrics."""

    def __init__(
        self,
        app: Any,
        settings: ServerSettings,
        metrics: ServerMetrics,
        known_model: Callable[[str], bool],
    ):
        self.app, self.settings, self.metrics, self.known_model = app, settings, metrics, known_model

    def _refusal(self, path: str, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        key = _bearer(headers)
        if path.startswith("/admin"):
            if self.settings.admin_key is not None:
                if not _key_matches(key, self.settings.admin_key):
                    return 401, "Admin endpoints need the admin key (Authorization: Bearer <admin key>)."
            elif self.settings.api_key is not None:
                return 403, "Admin endpoints are disabled: the server was started without --admin-key."
        elif self.settings.api_key is not None and (
            path.startswith("/v1") or (path in OPS_ROUTES and not self.settings.open_ops)
        ):
            admin = self.settings.admin_key is not None and _key_matches(key, self.settings.admin_key)
            if not admin and not _key_matches(key, self.settings.api_key):
                return 401, "Incorrect or missing API key (Authorization: Bearer <key>)."
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return 413, self._too_large()
        return None

    def _too_large(self) -> str:
        return f"Request body over the server's limit of {self.settings.max_body_bytes} bytes."

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = time.perf_counter()
        state = scope.setdefault("state", {})
        state["arrival"], state["cancelled"] = arrival, False
        headers = dict(scope["headers"])
        path = scope["path"]
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        state["request_id"] = request_id
        status, finished, received, stalled = 0, False, 0, False

        async def send_wrapper(message: dict) -> None:
            nonlocal status, finished, stalled
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            # The server's send waits while the client's socket is full; a client that never reads would
            # hold its engine lease (and its place in the engine's batch) forever.
            try:
                await asyncio.wait_for(send(message), self.settings.send_timeout)
            except asyncio.TimeoutError:
                stalled, finished = True, False
                raise ClientStalled(f"client sent nothing for {self.settings.send_timeout:g} s") from None

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.settings.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def refuse(code: int, message: str) -> None:
            body = json.dumps(error_body(code, message)).encode()
            extra = [(b"www-authenticate", b"Bearer")] if code == 401 else []
            await send_wrapper(
                {
                    "type": "http.response.start",
                    "status": code,
                    "headers": [(b"content-type", b"application/json"), *extra],
                }
            )
            await send_wrapper({"type": "http.response.body", "body": body})

        refusal = self._refusal(path, headers)
        try:
            if refusal is not None:
                await refuse(*refusal)
            else:
                await self.app(scope, limited_receive, send_wrapper)
        except _BodyTooLarge:
            if status == 0:
                await refuse(413, self._too_large())
        except ClientStalled:
            # Nothing more can be sent: the request is over (its stream was closed on the way out, which
            # returned its lease and aborted its engine request); the server closes the connection, and the
            # access log line below says `stalled`.
            pass
        finally:
            self._record(scope, state, path, status, finished, arrival, request_id, stalled)

    def _record(
        self,
        scope: dict,
        state: dict,
        path: str,
        status: int,
        finished: bool,
        arrival: float,
        request_id: str,
        stalled: bool,
    ) -> None:
        seconds = time.perf_counter() - arrival
        cancelled = state.get("cancelled", False) or (status != 0 and not finished)
        endpoint = ENDPOINTS.get(path)
        model = state.get("model")
        observation = state.get("observation")
        if endpoint is not None:
            label = model if model is not None and self.known_model(model) else UNKNOWN_MODEL
            self.metrics.observe_request(
                label, endpoint, status or 499, seconds, observation, cancelled, stalled
            )
        entry = {
            "request_id": request_id,
            "method": scope["method"],
            "path": path,
            "status": status or 499,
            "ms": round(1000 * seconds, 1),
            "model": model,
            "cancelled": cancelled,
            "stalled": stalled,
            "client": (scope.get("client") or ("-",))[0],
        }
        if observation is not None:
            entry["prompt_tokens"] = observation.prompt_tokens
            entry["completion_tokens"] = observation.completion_tokens
            if observation.first_token is not None:
                entry["ttft_ms"] = round(1000 * (observation.first_token - observation.started), 1)
        access_log.info(json.dumps(entry, ensure_ascii=False))
