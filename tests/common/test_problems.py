"""The error tree as problem details (common.problems): every class has its status and type, the fields a client
acts on travel as extension members, and anything outside the tree says nothing about the server."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from common import errors
from common.errors import Billing, ErrorClass, ImagegateError
from common.problems import PROBLEM_TYPE_PREFIX, problem_for, status_for

BUDGET = errors.BudgetExceeded(
    budget_id=3,
    budget_name="team",
    mode="live",
    limit_micro_usd=1_000_000,
    spent_micro_usd=900_000,
    reserved_micro_usd=50_000,
    requested_micro_usd=80_000,
)


@pytest.mark.parametrize(
    ("error", "status", "slug"),
    [
        (errors.InvalidInput("bad", {"prompt": "empty"}), 422, "invalid-input"),
        (errors.PermissionDenied("no"), 403, "permission-denied"),
        (errors.AccountLocked("locked", datetime(2026, 11, 30, tzinfo=UTC)), 423, "account-locked"),
        (errors.NotFound("gone"), 404, "not-found"),
        (errors.Conflict("stale"), 409, "conflict"),
        (errors.DatabaseUnavailable("down"), 503, "database-unavailable"),
        (BUDGET, 402, "budget-exceeded"),
        (
            errors.ProviderError(ErrorClass.TIMEOUT, "slow", provider="fal-qwen", billing=Billing.UNKNOWN),
            502,
            "provider-failed",
        ),
    ],
)
def test_each_class_has_its_status_and_type(error: ImagegateError, status: int, slug: str) -> None:
    problem = problem_for(error)
    assert (problem.status, problem.type) == (status, PROBLEM_TYPE_PREFIX + slug)
    assert status_for(error) == status
    body = problem.body()
    assert body["detail"] == str(error) and body["status"] == status and body["title"]


def test_every_class_in_the_tree_is_mapped() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, ImagegateError)]
    unmapped = [c.__name__ for c in classes if c is not ImagegateError and status_for(c.__new__(c)) == 500]
    assert unmapped == []


def test_the_fields_a_client_acts_on_are_extension_members() -> None:
    body = problem_for(errors.InvalidInput("bad", {"params.seed": "not a whole number"})).body()
    assert body["errors"] == [{"field": "params.seed", "detail": "not a whole number"}]
    budget = problem_for(BUDGET).body()
    assert (budget["budget_name"], budget["left_micro_usd"], budget["requested_micro_usd"]) == ("team", 50_000, 80_000)
    provider = problem_for(
        errors.ProviderError(
            ErrorClass.RATE_LIMITED,
            "slow down",
            provider="ideogram",
            billing=Billing.NOT_BILLED,
            retry_after_s=3.0,
        )
    ).body()
    assert provider["billing"] == "not_billed" and provider["retry_after_s"] == 3.0
    billed = problem_for(
        errors.ProviderError(
            ErrorClass.UNAVAILABLE, "x", provider="fal-qwen", billing=Billing.BILLED, billed_units=Decimal("0.262144")
        )
    ).body()
    assert billed["billed_units"] == "0.262144"


def test_anything_else_is_an_internal_error_that_says_nothing() -> None:
    problem = problem_for(RuntimeError("password=hunter2 at /srv/secret"))
    assert problem.status == 500 and problem.detail is None
    assert "hunter2" not in str(problem.body())
