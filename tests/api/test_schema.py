"""Schemathesis against the served OpenAPI spec: every operation fuzzed with an admin's token, on SQLite, through a
real uvicorn server. No answer may be a 5xx, an undocumented status, or a body that breaks its schema."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.core.result import Ok
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from core.api_tokens import create_token
from core.security import Actor
from db.engine import transaction
from db.models import Role, User
from emulator.runner import BackgroundServer, serve_in_thread
from tests.core.generation.service_support import seed

EXAMPLES_PER_OPERATION = 15
SEMANTIC = [checks.positive_data_acceptance]
"""Schema-valid is not always valid: a prompt of spaces or a seed outside a provider's range passes the schema and
is refused by core with a 422 naming the field. Every other check runs: no 5xx, only documented statuses, content
types, headers and bodies as the schema says, schema-invalid input refused."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BackgroundServer, str]]:
    from db import migrate
    from db.engine import make_engine, session_factory

    url = f"sqlite:///{tmp_path_factory.mktemp('schema') / 'api.db'}"
    migrate.upgrade(url)
    factory: sessionmaker[Session] = session_factory(make_engine(url))
    seed(factory)
    with transaction(factory) as session:
        admin = User(username="root", password_hash="not-a-real-hash", role=Role.ADMIN)
        session.add(admin)
        session.flush()
        token = create_token(session, Actor.system("tests"), admin.id, "schemathesis").secret
    with serve_in_thread(create_app(factory)) as server:
        yield server, token


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGATE_EMULATOR_URL", raising=False)
    monkeypatch.setenv("IMAGEGATE_API_RATE_LIMIT", "100000")


def test_the_api_keeps_to_its_spec(served: tuple[BackgroundServer, str]) -> None:
    """Each operation in turn (schemathesis' pytest plugin does not load lazily under pytest 9: the operations
    are walked here instead, each as its own Hypothesis run); failures are collected, then reported together."""
    server, token = served
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            failures.append(f"the spec has an operation schemathesis cannot read: {result.err()}")
            continue
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate(headers=headers, excluded_checks=SEMANTIC, timeout=60)

        try:
            check()
        except BaseException as failure:  # every operation is checked, then all failures reported together
            failures.append(f"{operation.label}: {failure}")
    assert operations >= 20
    assert not failures, "\n\n".join(failures)
