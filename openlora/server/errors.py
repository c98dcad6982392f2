"""Every failure -> OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}`.

OpenLoRA's exceptions carry their HTTP status (openlora.errors); validation errors become 400 (not
FastAPI's 422); unknown routes and methods keep their 404/405. Anything else is a server bug: it is
logged with its traceback and answered 500, and the server keeps running.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openlora.errors import AdapterNotFound, OpenLoRAError, Overloaded, RequestTooLong

log = logging.getLogger("openlora.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


class Unauthorized(OpenLoRAError):
    """Missing or wrong API key / admin key."""

    status = 401
    code = "authentication_error"


def error_body(message: str, status: int, *, type_: str | None = None, param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_ or _TYPES.get(status, "internal_error"),
                      "param": param, "code": code}}


def error_response(message: str, status: int, **kw) -> JSONResponse:
    return JSONResponse(error_body(message, status, **kw), status_code=status)


def from_exception(e: BaseException) -> tuple[int, dict]:
    """(status, body) for any exception; non-OpenLoRA exceptions are 500 (and should be logged)."""
    if isinstance(e, OpenLoRAError):
        code = ("model_not_found" if isinstance(e, AdapterNotFound)
                else "context_length_exceeded" if isinstance(e, RequestTooLong)
                else "rate_limit_exceeded" if isinstance(e, Overloaded)
                else "invalid_api_key" if isinstance(e, Unauthorized) else None)
        return e.status, error_body(str(e), e.status, type_=e.code, code=code)
    return 500, error_body(f"internal server error: {type(e).__name__}", 500)


def install_error_handlers(app: FastAPI) -> None:
    """Map validation errors, HTTP errors, OpenLoRA errors and bugs to OpenAI error JSON."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        return error_response(msg or "invalid request", 400, param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(OpenLoRAError)
    async def _openlora(request: Request, exc: OpenLoRAError) -> JSONResponse:
        status, body = from_exception(exc)
        if status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc)
        retry = getattr(exc, "retry_after", None)  # rate limits: when to come back, in whole seconds
        headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}", 500), status_code=500)
