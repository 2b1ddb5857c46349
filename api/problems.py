"""Every error answered as RFC 9457 problem details (`application/problem+json`), mapped once: the core error
tree through common.problems, FastAPI's request validation with a field per error, HTTP errors (404 of an unknown
route, 405) in the same shape, and anything unexpected as a bare 500 that says nothing about the server."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import ImagegateError
from common.problems import PROBLEM_TYPE_PREFIX, Problem, problem_for

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "AuthenticationRequired",
    "TooManyRequests",
    "install_problem_handlers",
    "problem_response",
]

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


class AuthenticationRequired(Exception):
    """No usable bearer token: 401 with a `WWW-Authenticate` challenge (not the 403 of a known, refused actor)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class TooManyRequests(Exception):
    """A token over its rate limit: 429 with `Retry-After`."""

    def __init__(self, detail: str, retry_after_s: int, limit: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.limit = limit


def problem_response(problem: Problem, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = problem.body()
    body.update(extra)
    return JSONResponse(body, status_code=problem.status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


async def _on_imagegate_error(_: Request, error: Exception) -> JSONResponse:
    problem = problem_for(error)
    headers = None
    retry_after = getattr(error, "retry_after_s", None)
    if problem.status in (429, 503) and retry_after:
        headers = {"Retry-After": str(int(retry_after) + 1)}
    return problem_response(problem, headers)


async def _on_validation_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    fields = [{"field": _location(e.get("loc", ())), "detail": str(e.get("msg", "invalid"))} for e in error.errors()]
    detail = "; ".join(f"{f['field']}: {f['detail']}" for f in fields) or "the request is not valid"
    problem = Problem(
        PROBLEM_TYPE_PREFIX + "invalid-input", "The request is not valid", 422, detail, {"errors": fields}
    )
    return problem_response(problem)


async def _on_http_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    slug = {404: "not-found", 405: "method-not-allowed", 413: "too-large", 429: "rate-limited"}.get(
        error.status_code, "http-error"
    )
    problem = Problem(PROBLEM_TYPE_PREFIX + slug, str(error.detail), error.status_code, str(error.detail))
    return problem_response(problem, dict(error.headers) if error.headers else None)


async def _on_authentication_required(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, AuthenticationRequired)
    problem = Problem(PROBLEM_TYPE_PREFIX + "unauthenticated", "Authentication required", 401, error.detail)
    return problem_response(problem, {"WWW-Authenticate": 'Bearer realm="imagegate"'})


async def _on_too_many_requests(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, TooManyRequests)
    problem = Problem(
        PROBLEM_TYPE_PREFIX + "rate-limited", "Too many requests", 429, error.detail, {"limit_per_minute": error.limit}
    )
    return problem_response(problem, {"Retry-After": str(error.retry_after_s)})


async def _on_unexpected(_: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error answering a request", exc_info=error)
    return problem_response(problem_for(error))


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AuthenticationRequired, _on_authentication_required)
    app.add_exception_handler(TooManyRequests, _on_too_many_requests)
    app.add_exception_handler(ImagegateError, _on_imagegate_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
