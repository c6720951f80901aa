"""OpenAI-shaped JSON errors ({"error": {message, type, param, code}}) for the server's own refusals.

Errors raised inside vLLM's serving layer already come back in this shape (vLLM's ErrorResponse); these
are the ones the server adds: auth, unknown model, capacity, body size, admin operations.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """A refusal with its HTTP status; rendered by `error_response`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or HTTPStatus(status).phrase.lower().replace(" ", "_")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body of an error; `code` defaults to the status phrase in snake case."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code or HTTPStatus(status).phrase.lower().replace(" ", "_"),
        }
    }


def error_response(error: ApiError) -> JSONResponse:
    """`error` as a response; a 401 says which scheme to use (WWW-Authenticate: Bearer)."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(
        error_body(error.status, error.message, error.param, error.code),
        status_code=error.status,
        headers=headers,
    )
