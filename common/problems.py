"""The error tree as the outside world sees it: ERROR_KINDS is the one table of each class's CLI exit code, HTTP
status and problem type, and `problem_for` renders an error as RFC 9457 problem details with the fields a client
can act on. The REST API answers with it (`application/problem+json`) and a
failed generation job stores it, so a job's error reads the same as a synchronous one.

    problem = problem_for(error)          # Problem(type=..., title=..., status=..., detail=..., ...)
    body = problem.body()                 # the JSON object, extension members included

Anything outside the tree is an internal error: status 500 with no detail, so nothing about the server leaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from common.errors import (
    AccountLocked,
    BudgetExceeded,
    Conflict,
    DatabaseUnavailable,
    ImagegateError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    ProviderError,
)

__all__ = ["ERROR_KINDS", "PROBLEM_TYPE_PREFIX", "ErrorKind", "Problem", "kind_of", "problem_for", "status_for"]

PROBLEM_TYPE_PREFIX = "urn:imagegate:problem:"
"""Problem types are URNs: stable identifiers a client can switch on, not pages to fetch."""


@dataclass(frozen=True)
class ErrorKind:
    """How one class of the error tree is answered everywhere: the CLI's exit code, the HTTP status, the
    problem type's slug and its title. The ONE table: cli.main and the REST API both read it."""

    error: type[ImagegateError]
    exit_code: int
    status: int
    slug: str
    title: str


ERROR_KINDS: tuple[ErrorKind, ...] = (
    ErrorKind(InvalidInput, 2, 422, "invalid-input", "The request is not valid"),
    ErrorKind(AccountLocked, 3, 423, "account-locked", "The account is locked"),
    ErrorKind(PermissionDenied, 3, 403, "permission-denied", "Not allowed"),
    ErrorKind(NotFound, 4, 404, "not-found", "Not found"),
    ErrorKind(Conflict, 5, 409, "conflict", "Changed by someone else"),
    ErrorKind(DatabaseUnavailable, 6, 503, "database-unavailable", "The database is unavailable"),
    ErrorKind(ProviderError, 7, 502, "provider-failed", "The image provider failed"),
    ErrorKind(BudgetExceeded, 8, 402, "budget-exceeded", "A budget has not enough left"),
)
"""The first kind an error is an instance of decides."""


def kind_of(error: BaseException) -> ErrorKind | None:
    return next((kind for kind in ERROR_KINDS if isinstance(error, kind.error)), None)


@dataclass(frozen=True)
class Problem:
    type: str
    title: str
    status: int
    detail: str | None
    extensions: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status}
        if self.detail is not None:
            body["detail"] = self.detail
        body.update(self.extensions)
        return body


def status_for(error: BaseException) -> int:
    kind = kind_of(error)
    return 500 if kind is None else kind.status


def _extensions(error: ImagegateError) -> dict[str, Any]:
    if isinstance(error, InvalidInput):
        # One entry per field, in the shape FastAPI clients know (a location and a message).
        return {"errors": [{"field": name, "detail": message} for name, message in error.field_errors.items()]}
    if isinstance(error, AccountLocked):
        return {"locked_until": _iso(error.until)}
    if isinstance(error, BudgetExceeded):
        return {
            "budget_id": error.budget_id,
            "budget_name": error.budget_name,
            "mode": error.mode,
            "limit_micro_usd": error.limit_micro_usd,
            "spent_micro_usd": error.spent_micro_usd,
            "reserved_micro_usd": error.reserved_micro_usd,
            "left_micro_usd": error.left_micro_usd,
            "requested_micro_usd": error.requested_micro_usd,
        }
    if isinstance(error, ProviderError):
        extensions: dict[str, Any] = {
            "provider": error.provider,
            "error_class": error.error_class.value,
            "billing": error.billing.value,
            "billed_units": None if error.billed_units is None else str(error.billed_units),
        }
        if error.retry_after_s is not None:
            extensions["retry_after_s"] = error.retry_after_s
        result = getattr(error, "result", None)  # GenerationFailed carries every attempt
        to_dict = getattr(result, "to_dict", None)
        if callable(to_dict):
            generation = to_dict()
            extensions["generation_id"] = generation.get("generation_id")
            extensions["attempts"] = generation.get("attempts", [])
        return extensions
    return {}


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def problem_for(error: BaseException) -> Problem:
    """The problem details of `error`: its class decides status and type; the message is the detail."""
    kind = kind_of(error)
    if kind is None or not isinstance(error, ImagegateError):
        return Problem(PROBLEM_TYPE_PREFIX + "internal", "Internal error", 500, None)
    return Problem(PROBLEM_TYPE_PREFIX + kind.slug, kind.title, kind.status, str(error), _extensions(error))
