"""One error shape for everything the server answers with an error status: OpenAI's
{"error": {"message", "type", "param", "code"}}.

The server's own refusals (auth, unknown model, capacity, body size, admin operations) are `ApiError`s;
errors from vLLM's serving layer (its `ErrorResponse`, whose `code` is an integer) and from the web
framework (unknown route, wrong method, unparsable body) are converted to the same shape here, with a
message that says what to change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
# A pydantic error location is a path of field names and list indexes, interleaved with the names of
# union members and validator kinds ("ChatCompletionUserMessageParam", "function-after[...]"); only the
# field names and indexes mean something to the client.
_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
MAX_LISTED_PROBLEMS = 3
_SURROGATE = re.compile("[\ud800-\udfff]")


def _code(status: int) -> str:
    return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


class ApiError(Exception):
    """A refusal with its HTTP status; rendered by `error_response`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or _code(status)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body of an error; `code` defaults to the status phrase in snake case."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code or _code(status),
        }
    }


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    """`error` as a response; a 401 says which scheme to use (WWW-Authenticate: Bearer)."""
    headers = dict(headers or {})
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        error_body(error.status, error.message, error.param, error.code),
        status_code=error.status,
        headers=headers or None,
    )


def from_vllm(response: Any) -> ApiError:
    """vLLM's `ErrorResponse` (integer `code`, its own `type` names) as one of ours."""
    info = response.error
    return ApiError(int(info.code), str(info.message), info.param)


def field_path(location: Iterable[Any]) -> str | None:
    """`("body", "messages", 0, "ChatCompletionUserMessageParam", "content")` -> "messages.0.content"."""
    parts = [
        str(part)
        for part in location
        if isinstance(part, int) or (isinstance(part, str) and _FIELD.match(part) and part != "body")
    ]
    return ".".join(parts) or None


def validation_error(problems: list[dict[str, Any]]) -> ApiError:
    """FastAPI's request validation errors as one 400 that names the fields to fix."""
    for problem in problems:
        if problem.get("type") == "json_invalid":
            reason = (problem.get("ctx") or {}).get("error", "unreadable")
            where = [part for part in problem.get("loc", ()) if isinstance(part, int)]
            at = f" at character {where[0]}" if where else ""
            return ApiError(400, f"The request body is not valid JSON ({reason}{at}).", "body")
        if tuple(problem.get("loc", ())) == ("body",):
            if problem.get("type") == "missing":
                return ApiError(400, "The request needs a JSON body.", "body")
            return ApiError(
                400, "The request body must be a JSON object (Content-Type: application/json).", "body"
            )
    listed: list[str] = []
    for problem in problems:
        path = field_path(problem.get("loc", ()))
        line = f"`{path}`: {problem.get('msg', 'invalid value')}" if path else str(problem.get("msg"))
        if line not in listed:
            listed.append(line)
    more = len(listed) - MAX_LISTED_PROBLEMS
    message = "; ".join(listed[:MAX_LISTED_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
    return ApiError(
        400, f"Invalid request: {message}.", field_path(problems[0].get("loc", ())) if problems else None
    )


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string in `value` holding a lone UTF-16 surrogate (JSON's "\\ud800" escape
    decodes to one; tokenizers cannot encode it), or None."""
    if isinstance(value, str):
        return (path or "body") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None
