"""Database fixtures (both backends) for the generation service's tests, and the seeded database they share."""

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.core.generation.service_support import seed
from tests.dbfixtures import *  # noqa: F403


@pytest.fixture
def factory(db_session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """A fresh database with the service's seed (an admin, prices, settings): what `generate()` needs."""
    seed(db_session_factory)
    return db_session_factory


@pytest.fixture
def sandbox_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No emulator URL from the environment: every provider without a key runs on the sandbox."""
    monkeypatch.delenv("IMAGEGATE_EMULATOR_URL", raising=False)
