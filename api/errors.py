"""One exception hierarchy for the HTTP API and the one handler that renders it.

Every error response has the same body: ``{"error": {"code": ..., "message": ...}}`` (validation
errors add ``details``: the failing field paths). Services raise these; routes never build error
responses by hand.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("modelpress.api")


class ApiError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None,
                 headers: dict[str, str] | None = None, details: Any = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers
        self.details = details


class BadRequest(ApiError):
    status_code, code = 400, "bad_request"


class Unauthorized(ApiError):
    status_code, code = 401, "unauthorized"

    def __init__(self, message: str = "missing or invalid API key", **kw: Any):
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class NotFound(ApiError):
    status_code, code = 404, "not_found"


class Conflict(ApiError):
    status_code, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status_code, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status_code, code = 415, "unsupported_media_type"


class RangeNotSatisfiable(ApiError):
    status_code, code = 416, "range_not_satisfiable"


class Unprocessable(ApiError):
    status_code, code = 422, "unprocessable"


class TooManyRequests(ApiError):
    status_code, code = 429, "too_many_requests"

    def __init__(self, message: str, retry_after_s: float, **kw: Any):
        kw.setdefault("headers", {"Retry-After": str(max(1, math.ceil(retry_after_s)))})
        super().__init__(message, **kw)


class ServiceUnavailable(ApiError):
    status_code, code = 503, "unavailable"


#: an error message never carries more than this (never echo unbounded input)
MAX_MESSAGE_CHARS = 2000

#: seconds a client should wait before retrying after the database was unreachable or busy
DB_RETRY_AFTER_S = 5


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"error": err}


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
                 413: "payload_too_large", 415: "unsupported_media_type", 422: "unprocessable",
                 429: "too_many_requests"}


def _loc(loc: Any) -> str:
    return ".".join(str(p) for p in loc)


def validation_details(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"field": _loc(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")}
            for e in errors]


def _unavailable(message: str) -> JSONResponse:
    return JSONResponse(error_body("unavailable", message), status_code=503,
                        headers={"Retry-After": str(DB_RETRY_AFTER_S)})


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message[:MAX_MESSAGE_CHARS], exc.details),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(list(exc.errors()))
        msg = "; ".join(f"{d['field']}: {d['message']}" for d in details) or "invalid request"
        return JSONResponse(error_body("validation_error", msg, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(_req: Request, exc: PoolTimeout) -> JSONResponse:
        log.warning("no database connection free: %s", exc)
        return _unavailable("the service is busy (no database connection free); retry shortly")

    @app.exception_handler(OperationalError)
    async def _db_down(_req: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return _unavailable("the database is unavailable; retry shortly")

    # a safety net behind the request guards: a value the database cannot store (out of
    # range, not text) is the client's error, not the server's
    @app.exception_handler(DataError)
    async def _bad_value(_req: Request, exc: DataError) -> JSONResponse:
        log.info("database refused a value: %s", str(exc.orig).splitlines()[0] if exc.orig else exc)
        return JSONResponse(error_body("invalid_value", "a value in the request is out of range "
                                       "or not valid text"), status_code=422)

    @app.exception_handler(UnicodeEncodeError)
    async def _not_text(_req: Request, _exc: UnicodeEncodeError) -> JSONResponse:
        return JSONResponse(error_body("invalid_value", "a string in the request is not valid "
                                       "Unicode text"), status_code=422)

    @app.exception_handler(DBAPIError)
    async def _db_error(_req: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:  # the connection died under the request (a restart)
            log.warning("database connection lost: %s", exc)
            return _unavailable("the database connection was lost; retry shortly")
        log.exception("database error", exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
