"""What every route needs: the database's sessions, this process's job runner, and the acting account from the
bearer token (authenticated in core; authorized again by each core call).

- `acting_account`: the dependency most routes use; one transaction authenticates the token and counts the
  request against its limit before the route runs.
- `bearer_token` + `in_token_transaction`: for the hot routes (POST /api/generate, GET /api/generations/{id}),
  whose own database work joins that same transaction: token, work, count, one commit.

Every dependency here is `async def`: FastAPI runs a plain `def` dependency on its thread pool, a thread hop per
request for what is an attribute read."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from api.problems import AuthenticationRequired, TooManyRequests
from api.runner import JobRunner
from common.errors import ImagegateError
from core.api_rate import RateDecision, count_request, default_rate_limit
from core.api_tokens import TokenGrant, TokenRefused, authenticate_request, check_token_form
from core.generation.dbexec import in_transaction
from core.security import Actor

__all__ = ["acting_account", "bearer_token", "in_token_transaction", "job_runner", "sessions"]

T = TypeVar("T")


def app_sessions(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.sessions
    return factory


async def sessions(request: Request) -> sessionmaker[Session]:
    return app_sessions(request)


async def job_runner(request: Request) -> JobRunner:
    runner: JobRunner = request.app.state.runner
    return runner


async def bearer_token(request: Request) -> str:
    """The request's API token as sent, checked for form only (no database): 401 when it is missing or cannot be
    an Imagegate token. Whether it is valid is core's to say (`core.api_tokens.authenticate_request`)."""
    header = request.headers.get("authorization", "")
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise AuthenticationRequired("send an API token: Authorization: Bearer igt_...")
    try:
        return check_token_form(raw)
    except TokenRefused as refused:
        raise AuthenticationRequired(str(refused)) from None


async def acting_account(request: Request) -> Actor:
    raw = await bearer_token(request)
    try:
        grant, decision = await in_transaction(
            app_sessions(request), functools.partial(authenticate_and_count, raw=raw, default=default_rate_limit())
        )
    except TokenRefused as refused:
        raise AuthenticationRequired(str(refused)) from None
    refuse_over_limit(decision)
    return grant.actor


def refuse_over_limit(decision: RateDecision) -> None:
    """429 (with Retry-After) when the request was over its token's limit."""
    if not decision.allowed:
        raise TooManyRequests(
            f"this API token may make {decision.limit} requests a minute; try again in {decision.retry_after_s} s",
            decision.retry_after_s,
            decision.limit,
        )


def authenticate_and_count(session: Session, raw: str, default: int) -> tuple[TokenGrant, RateDecision]:
    """One transaction per request: the token checked, and the request counted against its limit."""
    grant = authenticate_request(session, raw)
    return grant, count_request(session, grant.token_id, grant.rate_limit_per_minute or default)


class _OverLimit(Exception):
    """Raised inside a token's transaction to roll its work back; the refusal is then counted on its own."""

    def __init__(self, decision: RateDecision) -> None:
        super().__init__("over the rate limit")
        self.decision = decision


def _work_then_count(session: Session, raw: str, default: int, work: Callable[[Session, TokenGrant], T]) -> T:
    grant = authenticate_request(session, raw)
    value = work(session, grant)
    # Counted last: the token's window row, which every request of the token updates, stays locked only until
    # the commit instead of through the work.
    decision = count_request(session, grant.token_id, grant.rate_limit_per_minute or default)
    if not decision.allowed:
        raise _OverLimit(decision)
    return value


async def _count_alone(factory: sessionmaker[Session], raw: str, default: int) -> RateDecision:
    try:
        _grant, decision = await in_transaction(
            factory, functools.partial(authenticate_and_count, raw=raw, default=default)
        )
    except TokenRefused as refused:
        raise AuthenticationRequired(str(refused)) from None
    return decision


async def in_token_transaction(factory: sessionmaker[Session], raw: str, work: Callable[[Session, TokenGrant], T]) -> T:
    """`work(session, grant)` in ONE transaction with the token's authentication and the request's rate count:
    what `acting_account` and the route's own transaction did in two. Core still authorizes inside `work` (the
    grant carries the actor, never a decision).

    Every request still counts, and a token over its limit still hears 429 before anything else: when the token is
    over its limit, or `work` raises a refusal (an ImagegateError: not found, a key reused, ...), the transaction
    rolls back (nothing of `work` stays) and the request is counted in a transaction of its own."""
    default = default_rate_limit()
    try:
        return await in_transaction(factory, functools.partial(_work_then_count, raw=raw, default=default, work=work))
    except TokenRefused as refused:
        raise AuthenticationRequired(str(refused)) from None
    except _OverLimit as over:
        await _count_alone(factory, raw, default)
        refuse_over_limit(over.decision)
        raise  # not reached: the decision was a refusal, which refuse_over_limit raises as a 429
    except ImagegateError:
        refuse_over_limit(await _count_alone(factory, raw, default))
        raise
