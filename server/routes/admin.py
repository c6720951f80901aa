"""The admin API (/admin/models): list, load, swap and unload checkpoints while the server runs.

The gateway middleware guards these routes with the admin key; the registry does the work (a swap keeps
the old engine serving until the new one is ready, an unload lets in-flight requests finish).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from lape_awq.server.engines import EngineOptions, LoadError
from lape_awq.server.openai_errors import ApiError
from lape_awq.server.registry import ModelRegistry
from lape_awq.server.routes import registry_of, settings_of

router = APIRouter()


# The request bodies. No class docstrings: they would become OpenAPI schema descriptions.
class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")
    checkpoint: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


class SwapBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


def engine_options(request: Request, updates: dict[str, Any]) -> EngineOptions:
    """The server's engine options with a request's `options` applied; 400 for bad ones."""
    try:
        return settings_of(request).engine_options.with_updates(updates)
    except LoadError as error:
        raise ApiError(400, str(error), "options") from error


def describe(registry: ModelRegistry, name: str) -> dict:
    """The registry's row for `name` (as /v1/models lists it)."""
    return next(row for row in registry.describe() if row["id"] == name)


# No docstrings on the route functions: FastAPI would publish them as OpenAPI descriptions.
@router.get("/admin/models")
async def admin_models(request: Request) -> dict:
    registry = registry_of(request)
    draining = [
        {"id": old.name, "checkpoint": str(old.checkpoint), "in_flight": old.in_flight}
        for old in registry.draining
    ]
    return {"data": registry.describe(), "draining": draining}


@router.post("/admin/models")
async def admin_load(body: LoadBody, request: Request) -> dict:
    registry = registry_of(request)
    try:
        await registry.load(body.name, Path(body.checkpoint), engine_options(request, body.options))
    except LoadError as error:
        message = f"loading {body.checkpoint} failed: {error}"
        raise ApiError(422, message, "checkpoint", "load_failed") from error
    return describe(registry, body.name)


@router.post("/admin/models/{name:path}/swap")
async def admin_swap(name: str, body: SwapBody, request: Request) -> dict:
    registry = registry_of(request)
    try:
        await registry.swap(name, Path(body.checkpoint), engine_options(request, body.options))
    except LoadError as error:
        raise ApiError(
            422,
            f"swapping `{name}` to {body.checkpoint} failed, the previous checkpoint keeps serving: {error}",
            "checkpoint",
            "load_failed",
        ) from error
    return describe(registry, name)


@router.delete("/admin/models/{name:path}")
async def admin_unload(name: str, request: Request) -> dict:
    await registry_of(request).unload(name)
    return {"id": name, "deleted": True}
