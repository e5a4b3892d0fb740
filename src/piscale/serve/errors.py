"""Errors in the shape OpenAI clients expect.

Every failure the server reports is a JSON body

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

with an HTTP status that the official clients map to their exception classes
(400 ``BadRequestError``, 401 ``AuthenticationError``, 404 ``NotFoundError``,
408 timeout, 413 too large, 429 ``RateLimitError`` when the server is full,
500 ``InternalServerError``). A 500 says only that the request failed, with
an id to find it in the server's log: no exception text reaches a client. Raising ``APIError`` anywhere in a
request's handling produces such a response; nothing else reaches the client
as a bare traceback.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """A request failure with its HTTP status and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(message: str, *, param: str | None = None) -> APIError:
    return APIError(413, message, param=param, code="request_too_large")


def server_full(message: str) -> APIError:
    return APIError(429, message, code="server_full")


def internal_error(request_id: str) -> APIError:
    """A 500 that tells the client nothing but where to look in the log."""
    return APIError(500, f"the server failed to answer this request (id {request_id}; see the server log)")
