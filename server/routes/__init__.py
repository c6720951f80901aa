"""The HTTP routes, one FastAPI `APIRouter` per concern; `create_app` (server/app.py) includes them.

- `openai`: the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models), dispatched by `model`;
- `admin`: loading, swapping and unloading checkpoints (/admin/models);
- `ops`: /health and the Prometheus /metrics.
- `page`: the chat page at / (server/static/) and its /chat/config.

Routes keep no state of their own: as in vLLM's API server, they read what `create_app` put on
`app.state` (the registry, the metrics, the settings) through the accessors below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from lape_awq.server.app import ServerSettings
    from lape_awq.server.metrics import ServerMetrics
    from lape_awq.server.registry import ModelRegistry


def registry_of(request: Request) -> ModelRegistry:
    """The served names and their engines."""
    return request.app.state.registry


def metrics_of(request: Request) -> ServerMetrics:
    """The server's Prometheus metrics."""
    return request.app.state.metrics


def settings_of(request: Request) -> ServerSettings:
    """What `lape-awq serve` configured."""
    return request.app.state.settings
