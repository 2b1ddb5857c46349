"""The error tree as RFC 9457 problem details: the one map from an `ImagegateError` to an HTTP status, a stable
problem type and the fields a client can act on. The REST API answers with it (`application/problem+json`) and a
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

__all__ = ["PROBLEM_TYPE_PREFIX", "Problem", "problem_for", "status_for"]

PROBLEM_TYPE_PREFIX = "urn:imagegate:problem:"
"""Problem types are URNs: stable identifiers a client can switch on, not pages to fetch."""

# Most specific first: AccountLocked is not a PermissionDenied, but keep the order explicit anyway.
_KINDS: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (InvalidInput, 422, "invalid-input", "The request is not valid"),
    (AccountLocked, 423, "account-locked", "The account is locked"),
    (PermissionDenied, 403, "permission-denied", "Not allowed"),
    (NotFound, 404, "not-found", "Not found"),
    (Conflict, 409, "conflict", "Changed by someone else"),
    (DatabaseUnavailable, 503, "database-unavailable", "The database is unavailable"),
    (BudgetExceeded, 402, "budget-exceeded", "A budget has not enough left"),
    (ProviderError, 502, "provider-failed", "The image provider failed"),
)


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
    return next((status for cls, status, _, _ in _KINDS if isinstance(error, cls)), 500)


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
    for cls, status, slug, title in _KINDS:
        if isinstance(error, cls):
            assert isinstance(error, ImagegateError)
            return Problem(PROBLEM_TYPE_PREFIX + slug, title, status, str(error), _extensions(error))
    return Problem(PROBLEM_TYPE_PREFIX + "internal", "Internal error", 500, None)
