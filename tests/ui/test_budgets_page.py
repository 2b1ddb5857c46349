"""The Budgets page through AppTest: ADMIN and HERO only (a USER cannot reach it by link or URL, and core refuses
their reads); create with the message at the field and the input kept; edit, thresholds, soft with a degrade
action; reset with its history; delete; alerts with their delivery status, marked read per user; webhooks (ADMIN)
with the secret shown once, "send test" and the delivery log."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from common.errors import PermissionDenied
from core.budgets_view import load_budgets
from core.generation.budgets import list_budgets
from core.generation.models import GenerationRequest
from core.generation.service import generate_sync
from core.security import Role
from core.spend import alerts
from db.engine import transaction
from tests.ui.apptest_helpers import Console, by_key, console, console_any_db, pg_admin_dsn, pg_session_database, texts

__all__ = ["console", "console_any_db", "pg_admin_dsn", "pg_session_database"]


def _click(at: AppTest, label: str) -> None:
    next(b for b in at.button if b.label == label).click().run()
    assert not at.exception, at.exception


def _create(at: AppTest, name: str, limit: str, **fields: object) -> None:
    by_key(at.text_input, "budgets.new.name").input(name)  # type: ignore[attr-defined]
    by_key(at.text_input, "budgets.new.limit").input(limit)  # type: ignore[attr-defined]
    for key, value in fields.items():
        element = next(e for e in [*at.text_input, *at.toggle, *at.selectbox] if e.key == f"budgets.new.{key}")
        element.set_value(value)
    _click(at, "Create budget")


def _bars(at: AppTest) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def test_a_user_cannot_reach_budgets_by_link_or_url(console: Console) -> None:
    url_at = console.app(Role.USER, "budgets")  # the page is not registered for a USER: nothing of it shows
    assert [t.value for t in url_at.title] != ["Budgets"]
    assert not [b for b in url_at.button if b.label == "Create budget"]
    with pytest.raises(ValueError, match="Could not find a navigation page"):  # no link to it either
        url_at.switch_page(str(Path(__file__).resolve().parents[2] / "pages" / "budgets.py"))
    with console.runtime.sessions() as session, pytest.raises(PermissionDenied):
        load_budgets(session, console.users[Role.USER].actor())


@pytest.mark.parametrize("role", [Role.ADMIN, Role.HERO])
def test_create_with_errors_at_the_field_then_edit_and_delete(console: Console, role: Role) -> None:
    at = console.app(role, "budgets")
    assert at.title[0].value == "Budgets"
    _create(at, "Team monthly", "twelve")
    assert any("plain decimal" in e for e in _errors(at)), _errors(at)
    assert by_key(at.text_input, "budgets.new.name").value == "Team monthly"  # type: ignore[attr-defined]
    assert by_key(at.text_input, "budgets.new.limit").value == "twelve"  # type: ignore[attr-defined]
    with console.runtime.sessions() as session:
        assert list_budgets(session) == []
    by_key(at.text_input, "budgets.new.limit").input("12.50")  # type: ignore[attr-defined]
    by_key(at.text_input, "budgets.new.thresholds").input("25, 90")  # type: ignore[attr-defined]
    _click(at, "Create budget")
    assert any("Budget 'Team monthly' created." in s.value for s in at.success)
    with console.runtime.sessions() as session:
        (budget,) = list_budgets(session)
        assert budget.limit_micro_usd == 12_500_000 and budget.hard
        assert alerts.thresholds(session, budget.id) == ((25, 90), False)
    assert _bars(at)[0].startswith("spent $0.000000 + reserved $0.000000 of $12.500000")
    assert any("alerts at 25%, 90%" in c.value for c in at.caption)

    key = f"budgets.edit.{budget.id}"
    by_key(at.text_input, f"{key}.limit").input("-3")  # type: ignore[attr-defined]
    _click(at, "Save changes")
    assert any("negative" in e for e in _errors(at)), _errors(at)
    assert by_key(at.text_input, f"{key}.limit").value == "-3"  # type: ignore[attr-defined]
    by_key(at.text_input, f"{key}.limit").input("20")  # type: ignore[attr-defined]
    by_key(at.toggle, f"{key}.hard").set_value(False)  # type: ignore[attr-defined]
    by_key(at.selectbox, f"{key}.degrade").set_value("smaller_size")  # type: ignore[attr-defined]
    by_key(at.text_input, f"{key}.thresholds").input("50, 100")  # type: ignore[attr-defined]
    _click(at, "Save changes")
    with console.runtime.sessions() as session:
        (changed,) = list_budgets(session)
        assert (changed.limit_micro_usd, changed.hard, changed.degrade_action) == (20_000_000, False, "smaller_size")
        assert alerts.thresholds(session, budget.id) == ((50, 100), False)
    assert any("soft: over the limit, make a smaller image" in c.value for c in at.caption)

    assert next(b for b in at.button if b.label == "Delete budget").disabled  # until "I am sure"
    by_key(at.checkbox, f"budgets.danger.{budget.id}.sure").check().run()  # type: ignore[attr-defined]
    _click(at, "Delete budget")
    with console.runtime.sessions() as session:
        assert list_budgets(session) == []
    assert any("No budget yet" in i.value for i in at.info)


def test_spend_reset_history_and_alerts(console: Console) -> None:
    at = console.app(Role.ADMIN, "budgets")
    assert at.radio(key="budgets.mode").value == "simulated"  # no live provider here: simulated spend first
    _create(at, "Everyone monthly", "0.03")
    bob = console.users[Role.USER]
    result = generate_sync(
        GenerationRequest("a fox", provider="fal-qwen", allow_fallback=False), bob.actor(),
        factory=console.runtime.sessions,
    )  # fmt: skip
    assert result.ok
    with transaction(console.runtime.sessions) as session:
        assert alerts.detect_budget_alerts(session)  # $0.015729 is over 50 % of $0.03 (simulated)
    at.run()
    spent = _bars(at)[0]
    assert not spent.startswith("spent $0.000000"), spent
    assert "forecast by" in _bars(at)[1]
    # Alerts: unread for this admin, with the delivery status; marked read for alice only.
    assert any(
        h.value.startswith("Alerts (") and "unread" in h.value and "(0 unread)" not in h.value for h in at.subheader
    )
    frame = next(d.value for d in at.dataframe if "alert" in d.value.columns)
    assert (
        frame["webhooks"].tolist()[0] in ("none", "no webhooks", "pending", "delivered", "failed")
        or frame["webhooks"].tolist()[0]
    )
    _click(at, "Mark all read")
    assert any(h.value == "Alerts (0 unread)" for h in at.subheader)
    with console.runtime.sessions() as session:
        assert alerts.unread_count(session, console.users[Role.HERO].actor()) >= 1  # per user
    # Reset: the spent period goes to the history, the new one starts at zero.
    (budget_id,) = [b.id for b in list_budgets(console.runtime.sessions())]
    by_key(at.checkbox, f"budgets.danger.{budget_id}.sure").check().run()  # type: ignore[attr-defined]
    _click(at, "Reset this period (simulated)")
    assert _bars(at)[0].startswith("spent $0.000000 + reserved $0.000000 of $0.030000"), _bars(at)
    history = next(d.value for d in at.dataframe if "closed" in d.value.columns)
    assert history["closed"].str.startswith("reset ").sum() == 1
    assert spent.split(" ")[1] in history["spent"].tolist()  # the closed period kept its spend


def test_webhooks_secret_once_send_test_and_delivery_log(console: Console) -> None:
    hero = console.app(Role.HERO, "budgets")
    assert "Webhooks are managed by admins." in [c.value for c in hero.caption]
    at = console.app(Role.ADMIN, "budgets")
    by_key(at.text_input, "budgets.hook.name").input("ops")  # type: ignore[attr-defined]
    by_key(at.text_input, "budgets.hook.url").input("ftp://example.com/hook")  # type: ignore[attr-defined]
    _click(at, "Add webhook")
    assert _errors(at), "a bad URL is refused"
    assert by_key(at.text_input, "budgets.hook.name").value == "ops"  # type: ignore[attr-defined]
    by_key(at.text_input, "budgets.hook.url").input("https://hooks.example.com/imagegate")  # type: ignore[attr-defined]
    _click(at, "Add webhook")
    (secret,) = [c.value for c in at.code]
    assert len(secret) >= 32
    at.run()
    assert not at.code  # shown once
    assert any(t.startswith("ops → https://hooks.example.com/") for t in texts(at))  # the path masked
    _click(at, "Send test")
    log = next(d.value for d in at.dataframe if "event" in d.value.columns)
    assert log["event"].tolist() == ["test"] and log["status"].tolist() == ["pending"]
    _click(at, "Disable")
    assert any("disabled" in c.value for c in at.caption)
    log = next(d.value for d in at.dataframe if "event" in d.value.columns)
    assert log["status"].tolist() == ["failed"]  # a disabled webhook's pending delivery fails at once


def test_budgets_on_both_databases(console_any_db: Console) -> None:
    at = console_any_db.app(Role.HERO, "budgets")
    _create(at, "Both", "5")
    assert any("Budget 'Both' created." in s.value for s in at.success)
    assert _bars(at)[0].startswith("spent $0.000000 + reserved $0.000000 of $5.000000")
