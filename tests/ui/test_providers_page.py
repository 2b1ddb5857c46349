"""The Providers page through AppTest: ADMIN and HERO (a USER cannot reach it); every provider's mode, masked
key, breaker state with its reason, slots in flight and queued; probe now; breaker reset; fault injection only
with the emulator (which it then really changes)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from streamlit.testing.v1 import AppTest

from common.errors import ErrorClass
from core.generation import breaker, limits
from db.engine import transaction
from db.models import AuditLog, utcnow
from emulator.faults import FaultBoard
from emulator.runner import BackgroundServer, serve_in_thread
from emulator.server import create_emulator_app
from tests.ui.admin_helpers import console_db, open_as, page, rerun, titles

__all__ = ["console_db"]


def _button(at: AppTest, label: str, key: str | None = None) -> object:
    return next(b for b in at.button if b.label == label and (key is None or b.key == key))


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[BackgroundServer]:
    with serve_in_thread(create_emulator_app(FaultBoard())) as server:
        monkeypatch.setenv("IMAGEGATE_EMULATOR_URL", server.url)
        yield server


@pytest.mark.parametrize("username", ["alice", "hero"])
def test_staff_see_every_provider(
    console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, username: str
) -> None:
    at = open_as(monkeypatch, console_db, username, "providers")
    assert titles(at)[0] == "Providers"
    table = at.dataframe[0].value.set_index("id")
    assert set(table.index) == {"fal-qwen", "ideogram", "huggingface", "qwen", "sandbox"}
    assert set(table["mode"]) == {"sandbox"}
    assert set(table.loc[["fal-qwen", "ideogram"], "key"]) == {"not set"}
    assert set(table["breaker"]) == {"closed"}
    assert any("Sandbox mode" in w.value for w in at.warning)  # the banner, on this page too
    assert any("not available" in i.value and "sandbox" in i.value for i in at.info)  # no faults to inject
    at.toggle(key="providers_live").set_value(True)  # the table in a fragment that re-reads itself (timer not run)
    rerun(at)
    assert set(at.dataframe[0].value["id"]) == set(table.index)


def test_a_user_cannot_reach_providers(console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_as(monkeypatch, console_db, "bob", "providers")
    assert "Providers" not in titles(at)
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page(page("providers"))


def test_breaker_slots_probe_and_reset(console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    with transaction(console_db) as session:
        for _ in range(5):
            breaker.record_failure(session, "huggingface", ErrorClass.UNAVAILABLE, message="503 from the test")
        limits.ensure_slots(session, "ideogram", 1)
        # Leases far enough ahead to outlast a slow first page run (a waiter's own lease is 3 s, renewed by polling).
        later = utcnow() + timedelta(minutes=5)
        assert limits.try_acquire(session, "ideogram", "gen-1:1", 1, 1, now=later) is not None
        assert limits.try_acquire(session, "ideogram", "gen-2:1", 2, 1, now=later) is None  # waits
    at = open_as(monkeypatch, console_db, "alice", "providers")
    table = at.dataframe[0].value.set_index("id")
    assert table.loc["huggingface", "breaker"] == "open"
    assert table.loc["huggingface", "next probe"] != "—"
    assert (table.loc["ideogram", "in flight"], table.loc["ideogram", "queued"]) == (1, 1)
    assert any("503 from the test" in t.value for t in at.text)  # the breaker's reason

    _button(at, "Probe now", "probe-sandbox").click()  # type: ignore[attr-defined]
    rerun(at)
    assert any("Sandbox" in s.value and "probe ok" in s.value for s in at.success)
    assert at.dataframe[0].value.set_index("id").loc["sandbox", "last probe"].startswith("ok")

    _button(at, "Reset breaker", "reset-huggingface").click()  # type: ignore[attr-defined]
    rerun(at)
    assert at.dataframe[0].value.set_index("id").loc["huggingface", "breaker"] == "closed"
    with console_db() as session:
        assert "breaker.reset" in session.scalars(select(AuditLog.action)).all()


def test_fault_injection_with_the_emulator(
    console_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, emulator: BackgroundServer
) -> None:
    at = open_as(monkeypatch, console_db, "hero", "providers")
    assert set(at.dataframe[0].value.set_index("id").loc[["fal-qwen", "qwen"], "mode"]) == {"emulator"}
    faults = at.dataframe[1].value.set_index("provider")
    assert set(faults["fault"]) == {"none"}
    at.selectbox[0].select("fal-qwen")
    at.selectbox[1].select("server_error")
    at.number_input[0].set_value(3)
    _button(at, "Inject fault").click()  # type: ignore[attr-defined]
    rerun(at)
    assert any("fal-qwen: server_error for 3 request(s)" in s.value for s in at.success)
    state = httpx.get(f"{emulator.url}/_emulator/state").json()["providers"]["fal"]
    assert (state["fault"], state["fault_count"]) == ("server_error", 3)
    assert at.dataframe[1].value.set_index("provider").loc["fal-qwen", "fault"] == "server_error"

    # A fault that does not apply to a provider: the emulator's refusal is shown, nothing changes.
    at.selectbox[0].select("ideogram")
    at.selectbox[1].select("loading")
    _button(at, "Inject fault").click()  # type: ignore[attr-defined]
    rerun(at)
    assert any("does not apply to ideogram" in e.value for e in at.error)

    _button(at, "Clear fal-qwen").click()  # type: ignore[attr-defined]
    rerun(at)
    assert httpx.get(f"{emulator.url}/_emulator/state").json()["providers"]["fal"]["fault"] is None
    with console_db() as session:
        actions = session.scalars(select(AuditLog.action).where(AuditLog.action == "emulator.fault")).all()
    assert len(actions) == 2
