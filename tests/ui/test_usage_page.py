"""The Usage page through AppTest, for every role: figures from the rollups in one spend mode at a time, the charts
(titled, dollars formatted, each provider's one colour), the filters, the attempts behind them page by page, the
forecast; a USER sees only their own usage, and core refuses them anyone else's."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from streamlit.testing.v1 import AppTest

from common.errors import PermissionDenied
from core.generation.budgets import create_budget
from core.generation.models import GenerationRequest
from core.generation.service import generate_sync
from core.security import Actor, Role
from core.usage_view import UsageFilters, load_usage, recent_attempts, usage_csv
from db.engine import transaction
from tests.ui.apptest_helpers import Console, by_key, console, console_any_db, pg_admin_dsn, pg_session_database
from ui.charts import PROVIDER_COLOURS

__all__ = ["console", "console_any_db", "pg_admin_dsn", "pg_session_database"]


def _generate(console: Console, role: Role, provider: str, prompt: str = "a red fox in snow") -> str:
    result = generate_sync(
        GenerationRequest(prompt, provider=provider, allow_fallback=False),
        console.users[role].actor(),
        factory=console.runtime.sessions,
    )
    assert result.ok
    return result.generation_id


def _today() -> UsageFilters:
    today = datetime.now(UTC).date()
    return UsageFilters(date_from=today, date_to=today, spend_mode="simulated")


def _charts(at: AppTest) -> dict[str, dict]:  # type: ignore[type-arg]
    import json

    out = {}
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        out[spec["layout"]["title"]["text"]] = spec
    return out


def _attempt_users(at: AppTest) -> list[object]:
    frames = [d.value for d in at.dataframe if "generation" in d.value.columns]
    assert frames, "no attempts table"
    return list(frames[0]["user"].tolist())


def test_staff_see_everyones_usage_with_titled_dollar_charts(console: Console) -> None:
    alice = _generate(console, Role.ADMIN, "fal-qwen")
    bob = _generate(console, Role.USER, "huggingface")
    at = console.app(Role.ADMIN, "usage")
    assert at.title[0].value == "Usage"
    assert at.radio(key="usage.mode").value == "simulated"  # no live provider: simulated first
    charts = _charts(at)
    spend = charts["Spend per day by provider: simulated spend (emulator and sandbox)"]
    assert spend["layout"]["yaxis"]["tickprefix"] == "$"
    colours = {trace["name"]: trace["marker"]["color"] for trace in spend["data"]}
    assert colours == {"fal-qwen": PROVIDER_COLOURS["fal-qwen"], "huggingface": PROVIDER_COLOURS["huggingface"]}
    assert "Cost per image against the target" in charts
    assert "Latency per provider: p50 (solid) and p95 (hatched)" in charts
    assert "Success rate per provider" in charts
    # Both users' attempts, and both in the top users.
    assert set(_attempt_users(at)) == {"alice", "bob"}
    generations = next(d.value for d in at.dataframe if "generation" in d.value.columns)["generation"].tolist()
    assert set(generations) == {alice, bob}
    top = next(d.value for d in at.dataframe if "user" in d.value.columns and "spend" in d.value.columns)
    assert set(top["user"]) == {"alice", "bob"}
    # Live money: none here, and nothing simulated is shown as live.
    at.radio(key="usage.mode").set_value("live").run()
    assert any("No usage" in i.value for i in at.info)
    assert not at.get("plotly_chart")


@pytest.mark.parametrize("role", [Role.ADMIN, Role.HERO])
def test_staff_filter_by_user_and_provider(console: Console, role: Role) -> None:
    _generate(console, Role.ADMIN, "fal-qwen")
    _generate(console, Role.USER, "huggingface")
    at = console.app(role, "usage")
    bob = console.users[Role.USER].id
    by_key(at.selectbox, "usage.user").set_value(bob).run()  # type: ignore[attr-defined]
    assert set(_attempt_users(at)) == {"bob"}
    by_key(at.selectbox, "usage.user").set_value(None).run()  # type: ignore[attr-defined]
    by_key(at.selectbox, "usage.p").set_value("fal-qwen").run()  # type: ignore[attr-defined]
    assert set(_attempt_users(at)) == {"alice"}
    spend = _charts(at)["Spend per day by provider: simulated spend (emulator and sandbox)"]
    assert [t["name"] for t in spend["data"]] == ["fal-qwen"]


def test_a_user_sees_only_their_own_usage(console: Console) -> None:
    _generate(console, Role.ADMIN, "fal-qwen", "alice's secret prompt")
    mine = _generate(console, Role.USER, "huggingface")
    at = console.app(Role.USER, "usage")
    assert not at.exception
    assert "Your own usage only." in at.caption[0].value
    bob = console.users[Role.USER].id
    assert set(_attempt_users(at)) == {"bob"}
    generations = next(d.value for d in at.dataframe if "generation" in d.value.columns)["generation"].tolist()
    assert generations == [mine]
    assert not [s for s in at.selectbox if s.key == "usage.user"]  # no user filter
    assert not [h for h in at.subheader if h.value == "Top users"]
    assert not [h for h in at.subheader if h.value == "Recommendations"]
    spend = _charts(at)["Spend per day by provider: simulated spend (emulator and sandbox)"]
    assert [t["name"] for t in spend["data"]] == ["huggingface"]  # alice's fal-qwen spend is not in it
    # Core pins a USER to their own account and refuses anyone else's, whatever a page asks.
    with console.runtime.sessions() as session:
        actor = console.users[Role.USER].actor()
        view = load_usage(session, actor, _today())
        assert view.filters.user_id == bob and not view.staff and view.top_users == [] and view.optimizer is None
        assert {p.key for p in view.providers} == {"huggingface"}
        alice = console.users[Role.ADMIN].id
        with pytest.raises(PermissionDenied):
            load_usage(session, actor, _today().model_copy(update={"user_id": alice}))
        with pytest.raises(PermissionDenied):
            recent_attempts(session, actor, _today().model_copy(update={"user_id": alice}))


def test_attempts_page_by_page_and_the_forecast(console: Console) -> None:
    for _ in range(3):
        _generate(console, Role.USER, "fal-qwen")
    with transaction(console.runtime.sessions) as session:
        create_budget(
            session, Actor.system("test"), name="bob monthly", scope="user",
            scope_id=console.users[Role.USER].id, period="monthly", limit_micro_usd=1_000_000,
        )  # fmt: skip
    with console.runtime.sessions() as session:
        first = recent_attempts(session, console.users[Role.USER].actor(), _today(), limit=2)
        assert len(first.attempts) == 2 and first.next_before_id is not None
        rest = recent_attempts(
            session, console.users[Role.USER].actor(), _today(), before_id=first.next_before_id, limit=2
        )
        assert len(rest.attempts) == 1 and rest.next_before_id is None
        assert {a.id for a in first.attempts}.isdisjoint(a.id for a in rest.attempts)
    at = console.app(Role.USER, "usage")
    bars = [p.proto.text for p in at.get("progress")]
    assert len(bars) == 1 and bars[0].startswith("bob monthly (monthly, simulated)"), bars
    assert "projected" in bars[0]
    assert next(b for b in at.button if b.label == "Older").disabled  # 3 attempts: one page
    assert any(getattr(b, "label", None) == "Download CSV" for b in at.get("download_button"))


def test_usage_on_both_databases(console_any_db: Console) -> None:
    _generate(console_any_db, Role.USER, "fal-qwen")
    at = console_any_db.app(Role.ADMIN, "usage")
    assert not at.exception
    total = next(m for m in at.metric if m.label == "Spend")
    assert total.value.startswith("$") and total.value != "$0.000000"


def test_the_csv_has_exact_dollars_in_one_spend_mode(console: Console) -> None:
    _generate(console, Role.USER, "fal-qwen")
    with console.runtime.sessions() as session:
        view = load_usage(session, console.users[Role.USER].actor(), _today())
    lines = usage_csv(view).splitlines()
    assert lines[0] == "spend_mode,day,provider,attempts,images,actual_usd,cost_per_image_usd"
    today = datetime.now(UTC).date().isoformat()
    assert lines[1] == f"simulated,{today},fal-qwen,1,1,0.015729,0.015729"
    assert lines[-1] == "simulated,all days,total,1,1,0.015729,0.015729"
    assert all(line.startswith("simulated,") for line in lines[1:])
