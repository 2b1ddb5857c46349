"""The REST API's tests: a real FastAPI app (lifespan, job runner) over each database, sandbox providers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from core.api_tokens import create_token
from core.security import Actor
from db.engine import transaction
from db.models import Role, User
from tests.core.generation.service_support import seed
from tests.dbfixtures import *  # noqa: F403

SYSTEM = Actor.system("tests")


@dataclass(frozen=True)
class Api:
    client: TestClient
    factory: sessionmaker[Session]

    def token_for(self, username: str, role: Role = Role.USER, *, token_role: Role | None = None) -> str:
        with transaction(self.factory) as session:
            user = User(username=username, password_hash="not-a-real-hash", role=role)
            session.add(user)
            session.flush()
            created = create_token(session, SYSTEM, user.id, f"{username}'s token", role=token_role)
        return created.secret

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture(autouse=True)
def _sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGATE_EMULATOR_URL", raising=False)


@pytest.fixture
def api(db_session_factory: sessionmaker[Session]) -> Iterator[Api]:
    seed(db_session_factory)
    app = create_app(db_session_factory, max_body_bytes=16 * 1024)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, db_session_factory)
