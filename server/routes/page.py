"""The chat page: `/` (server/static/index.html, its script and style under /static) and `/chat/config`,
what the page needs to know before it calls the API (whether the API needs a key; whether the admin routes
need the admin key, are open, or are disabled). Both are public: the page itself calls only the public
OpenAI and admin routes, with the keys the user types, so the gateway's auth applies to it as to any client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from lape_awq.server.routes import settings_of

STATIC = Path(__file__).resolve().parents[1] / "static"
# The page loads nothing from elsewhere (no CDN: servers and their users are often offline).
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter()


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})


@router.get("/chat/config", include_in_schema=False)
async def chat_config(request: Request) -> dict:
    settings = settings_of(request)
    if settings.admin_key is not None:
        admin = "key"
    elif settings.api_key is not None:
        admin = "disabled"  # the gateway refuses /admin with 403 (server/middleware.py)
    else:
        admin = "open"
    return {"api_key_required": settings.api_key is not None, "admin": admin}
