"""The Audit page through AppTest: ADMIN and HERO (a USER cannot reach it); filters by actor, entity, action and
dates; the before/after of the chosen change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core import users
from core.security import Role
from db.engine import transaction
from tests.ui.admin_helpers import actor, console_db, open_as, page, rerun, titles

__all__ = ["console_db"]


@pytest.mark.parametrize("username", ["alice", "hero"])
def test_staff_read_and_filter_the_log(
    console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, username: str
) -> None:
    alice = actor(console_db, "alice")
    bob = actor(console_db, "bob")
    with transaction(console_db) as session:
        users.set_role(session, alice, bob.user_id or 0, Role.HERO)
    at = open_as(monkeypatch, console_db, username, "audit")
    assert titles(at)[0] == "Audit log"
    log = at.dataframe[0].value
    assert {"user.create_first_admin", "user.create", "user.set_role"} <= set(log["action"])

    at.text_input[0].input("user.set_role")  # action
    rerun(at)
    log = at.dataframe[0].value
    assert log["action"].tolist() == ["user.set_role"]
    assert log["who"].tolist() == ["alice"] and log["changed"].tolist() == ["role"]
    # The chosen change: role USER -> HERO.
    diff = at.dataframe[1].value
    assert diff.to_dict("records") == [{"field": "role", "before": "USER", "after": "HERO"}]

    at.text_input[0].input("")
    at.selectbox[0].select_index([o for o in at.selectbox[0].options].index("hero"))  # actor: hero did nothing
    rerun(at)
    assert any("No changes match" in i.value for i in at.info)
    at.selectbox[0].select_index(0)
    at.selectbox[1].select("user")  # entity
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    at.date_input[0].set_value((tomorrow - timedelta(days=10), tomorrow - timedelta(days=5)))
    rerun(at)
    assert any("No changes match" in i.value for i in at.info)


def test_a_user_cannot_reach_the_audit_log(console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_as(monkeypatch, console_db, "bob", "audit")
    assert "Audit log" not in titles(at)
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page(page("audit"))
