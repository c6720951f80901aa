"""Operations routes: /health (200 when every served model is ready or swapping, else 503) and the
Prometheus /metrics.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lape_awq.server.routes import metrics_of, registry_of

router = APIRouter()


# No docstrings on the route functions: FastAPI would publish them as OpenAPI descriptions.
@router.get("/health")
async def health(request: Request) -> JSONResponse:
    states = {row["id"]: row["state"] for row in registry_of(request).describe()}
    ok = bool(states) and all(state in ("ready", "swapping") for state in states.values())
    return JSONResponse({"status": "ok" if ok else "degraded", "models": states}, 200 if ok else 503)


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(metrics_of(request).render(), media_type="text/plain; version=0.0.4; charset=utf-8")
