"""What every route needs: the database's sessions, this process's job runner, and the acting account from the
bearer token (authenticated in core; authorized again by each core call)."""

from __future__ import annotations

import functools

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from api.problems import AuthenticationRequired
from api.runner import JobRunner
from core.api_tokens import TokenRefused, authenticate_token
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
        return await in_transaction(sessions(request), functools.partial(authenticate_token, raw=raw.strip()))
    except TokenRefused as refused:
        raise AuthenticationRequired(str(refused)) from None
