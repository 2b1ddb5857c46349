"""The PostgreSQL fixture's rule: skip when the server is unreachable, but fail under CI=true."""

from __future__ import annotations

import pytest

from tests.dbfixtures import require_pg


def test_unreachable_postgres_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not reachable"):
        require_pg(None)


def test_unreachable_postgres_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        require_pg(None)


def test_reachable_postgres_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_pg("host=127.0.0.1 dbname=postgres") == "host=127.0.0.1 dbname=postgres"
