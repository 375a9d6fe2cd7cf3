"""Errors in OpenAI's format (`{"error": {"message", "type", "param", "code"}}`) with their HTTP status."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import KombuError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """One refused request; `message` names the problem and the fix, `param` the request field."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role' (the way OpenAI names a field)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in ("body",):
            path += f".{part}" if path else str(part)
    return path


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The first problem of a pydantic validation, as a 400 naming the field."""
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if not (isinstance(part, str) and "[" in part and "]" in part)]
    param = field_path(loc) or None
    return APIError(400, f"{param or 'request body'}: {first.get('msg', 'invalid value')}", param=param,
                    code="invalid_value")


def install_handlers(app: FastAPI) -> None:
    """Every error this app answers comes out in OpenAI's format."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(list(error.errors())).response()

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(KombuError)
    async def _redis(_request: Request, error: Exception) -> JSONResponse:
        log.warning("Redis failed: %s", type(error).__name__)
        return APIError(503, f"Redis cannot be reached ({type(error).__name__}); check PERSONABOT_REDIS_URL and "
                        "retry", code="redis_unavailable", headers={"Retry-After": "5"}).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected API error")
        return APIError(500, f"internal error ({type(error).__name__}); see the API log",
                        code="internal_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        message = "no such route; the API serves /v1/models, /v1/chat/completions and /metrics" \
            if error.status_code == 404 else str(error.detail)
        return APIError(error.status_code, message, code=code).response()
