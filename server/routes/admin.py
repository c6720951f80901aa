"""The admin API (/admin/models): list, load, swap (or reload) and unload checkpoints while the server runs.

The gateway middleware guards these routes with the admin key; the registry does the work (a swap keeps
the old engine serving until the new one is ready, an unload lets in-flight requests finish). Before an
engine starts, a checkpoint path must lie inside the server's checkpoint roots (403 otherwise) and the
engine options must fit the machine and the model (400 otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from lape_awq.server.checkpoint_roots import OutsideRoots
from lape_awq.server.engines import (
    EngineOptions,
    LoadError,
    OptionsRefused,
    check_options_fit,
    read_model_config,
)
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
    checkpoint: str | None = Field(default=None, min_length=1)
    options: dict[str, Any] | None = None


def allowed_checkpoint(request: Request, given: str) -> Path:
    """`given` resolved, when it lies inside the server's checkpoint roots; 403 otherwise."""
    try:
        return registry_of(request).roots.allowed(Path(given))
    except OutsideRoots as error:
        raise ApiError(403, str(error), "checkpoint", "checkpoint_outside_roots") from error


def engine_options(request: Request, checkpoint: Path, updates: dict[str, Any]) -> EngineOptions:
    """The server's engine options with a request's `options` applied; 400 for bad ones and for ones the
    machine or the model cannot honour (an unreadable model config is left to the load, which says so)."""
    try:
        options = settings_of(request).engine_options.with_updates(updates)
    except LoadError as error:
        raise ApiError(400, str(error), "options") from error
    try:
        check_options_fit(options, read_model_config(checkpoint))
    except OptionsRefused as error:
        raise ApiError(400, f"engine options refused: {error}", "options", "options_refused") from error
    except LoadError:
        pass
    return options


def describe(registry: ModelRegistry, name: str) -> dict:
    """The registry's admin row for `name`."""
    return next(row for row in registry.describe(admin=True) if row["id"] == name)


# No docstrings on the route functions: FastAPI would publish them as OpenAPI descriptions.
@router.get("/admin/models")
async def admin_models(request: Request) -> dict:
    registry = registry_of(request)
    draining = [
        {
            "id": old.name,
            "checkpoint": old.label,
            "checkpoint_path": str(old.checkpoint),
            "in_flight": old.in_flight,
        }
        for old in registry.draining
    ]
    return {"data": registry.describe(admin=True), "draining": draining}


@router.post("/admin/models")
async def admin_load(body: LoadBody, request: Request) -> dict:
    registry = registry_of(request)
    checkpoint = allowed_checkpoint(request, body.checkpoint)
    try:
        await registry.load(body.name, checkpoint, engine_options(request, checkpoint, body.options))
    except LoadError as error:
        message = f"loading {body.checkpoint} failed: {error}"
        raise ApiError(422, message, "checkpoint", "load_failed") from error
    return describe(registry, body.name)


@router.post("/admin/models/{name:path}/swap")
async def admin_swap(name: str, body: SwapBody, request: Request) -> dict:
    registry = registry_of(request)
    checkpoint, options = None, None  # neither given: reload the current checkpoint as it was started
    if body.checkpoint is not None or body.options is not None:
        current = registry.slot(name).active
        if body.checkpoint is not None:
            checkpoint = allowed_checkpoint(request, body.checkpoint)
        elif current is not None:
            checkpoint = current.checkpoint
        else:
            raise ApiError(400, f"`{name}` has no checkpoint to reload; name one.", "checkpoint")
        options = engine_options(request, checkpoint, body.options or {})
    try:
        await registry.swap(name, checkpoint, options)
    except LoadError as error:
        target = body.checkpoint or "its checkpoint"
        raise ApiError(
            422,
            f"swapping `{name}` to {target} failed, the previous checkpoint keeps serving: {error}",
            "checkpoint",
            "load_failed",
        ) from error
    return describe(registry, name)


@router.delete("/admin/models/{name:path}")
async def admin_unload(name: str, request: Request) -> dict:
    await registry_of(request).unload(name)
    return {"id": name, "deleted": True}
