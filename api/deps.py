"""What every route needs: the database's sessions, this process's job runner, and the acting account from the
bearer token (authenticated in core; authorized again by each core call)."""

from __future__ import annotations

import functools

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from api.problems import AuthenticationRequired, TooManyRequests
from api.runner import JobRunner
from core.api_rate import RateDecision, count_request, default_rate_limit
from core.api_tokens import TokenGrant, TokenRefused, authenticate_request
from core.generation.dbexec import in_transaction
from core.security import Actor

__all__ = ["acting_account", "job_runner", "sessions"]


def sessions(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.sessions
    return factory


def job_runner(request: Request) -> JobRunner:
    runner: JobRunner = request.app.state.runner
    return runner


async def acting_account(request: Request) -> Actor:
    header = request.headers.get("authorization", "")
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise AuthenticationRequired("send an API token: Authorization: Bearer igt_...")
    try:
        grant, decision = await in_transaction(
            sessions(request), functools.partial(_authenticate_and_count, raw=raw.strip(), default=default_rate_limit())
        )
    except TokenRefused as refused:
        raise AuthenticationRequired(str(refused)) from None
    if not decision.allowed:
        raise TooManyRequests(
            f"this API token may make {decision.limit} requests a minute; try again in {decision.retry_after_s} s",
            decision.retry_after_s,
            decision.limit,
        )
    return grant.actor


def _authenticate_and_count(session: Session, raw: str, default: int) -> tuple[TokenGrant, RateDecision]:
    """One transaction per request: the token checked, and the request counted against its limit."""
    grant = authenticate_request(session, raw)
    return grant, count_request(session, grant.token_id, grant.rate_limit_per_minute or default)
