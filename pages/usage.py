"""Usage: spend per day by provider, cost per image against the target, latency, success rates and error
classes, top users (staff), the forecast and the optimizer's advice, the attempts behind them and a CSV.

Widgets only: core.usage_view loads every figure from the rollups and decides who sees what (a USER only their
own usage); the figures are ui.usage_charts'. One spend mode at a time: live and simulated never share a chart."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pandas as pd
import streamlit as st

from common.errors import ImagegateError
from core.catalog import PROVIDERS
from core.money import format_usd
from core.providers.registry import default_spend_view
from core.security import Role
from core.usage_log import STATUSES
from core.usage_view import UsageFilters, UsageView, load_usage, recent_attempts, usage_csv, user_choices
from ui import state, usage_charts

user = state.require_user()
actor = user.actor()

PAGES = "usage.pages"  # the keyset cursors of the attempt pages seen so far (Newer pops, Older pushes)
DEFAULT_DAYS = 30


def _money(micros: int | None) -> str:
    return "—" if micros is None else format_usd(micros)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value / 1000:,.2f} s"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _filters(staff: bool, users: dict[int, str]) -> UsageFilters | None:
    today = datetime.now(UTC).date()
    a, b, c, d = st.columns([2, 1, 1, 1])
    picked = a.date_input(
        "Days (UTC)", value=(today - timedelta(days=DEFAULT_DAYS - 1), today), max_value=today, key="usage.days"
    )
    spend = b.radio(
        "Spend",
        ["live", "simulated"],
        index=["live", "simulated"].index(default_spend_view()),
        key="usage.mode",
        horizontal=True,
        help="Live money and simulated (emulator, sandbox) runs are never added together.",
    )
    provider = c.selectbox("Provider", ["", *PROVIDERS], format_func=lambda p: p or "every provider", key="usage.p")
    user_id: int | None = None
    if staff:
        choices: list[int | None] = [None, *sorted(users, key=lambda uid: users[uid]), 0]
        user_id = d.selectbox(
            "User",
            choices,
            format_func=lambda uid: "everyone" if uid is None else ("system/CLI" if uid == 0 else users[uid]),
            key="usage.user",
        )
    if not isinstance(picked, tuple) or len(picked) != 2:
        st.info("Pick the last day of the range too.")
        return None
    first, last = picked
    assert isinstance(first, date) and isinstance(last, date)
    return UsageFilters(date_from=first, date_to=last, spend_mode=spend, provider=provider or None, user_id=user_id)


def _headline(view: UsageView) -> None:
    total = view.total
    cols = st.columns(5)
    cols[0].metric("Spend", _money(total.actual_micro_usd), help="Known actual cost (unknown billing held apart).")
    cols[1].metric("Images", f"{total.images:,}")
    cols[2].metric(
        "Cost per image",
        _money(total.cost_per_image_micro_usd),
        help=f"Target {format_usd(view.target_cost_per_image_micro_usd)} per image (global settings).",
    )
    cols[3].metric("Attempts", f"{total.attempts:,}", help=f"{total.unknown_billing} with billing still unknown")
    cols[4].metric("Success rate", _rate(total.success_rate))


def _charts(view: UsageView) -> None:
    if not view.days:
        st.info("No usage in these days with these filters.")
        return
    st.plotly_chart(usage_charts.spend_per_day(view), key="usage.chart.spend")
    left, right = st.columns(2)
    left.plotly_chart(usage_charts.cost_per_image(view), key="usage.chart.per_image")
    right.plotly_chart(usage_charts.latency(view), key="usage.chart.latency")
    left.plotly_chart(usage_charts.success_rate(view), key="usage.chart.success")
    if view.error_classes:
        right.plotly_chart(usage_charts.error_classes(view), key="usage.chart.errors")
    else:
        right.info("No failed attempts in these days.")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "provider": p.key,
                    "spend": _money(p.actual_micro_usd),
                    "images": p.images,
                    "cost per image": _money(p.cost_per_image_micro_usd),
                    "over target": "yes" if p.over_target else "no" if p.over_target is not None else "—",
                    "attempts": p.attempts,
                    "success": _rate(p.success_rate),
                    "p50": _ms(p.p50_ms),
                    "p95": _ms(p.p95_ms),
                }
                for p in view.providers
            ]
        ),
        hide_index=True,
        width="stretch",
    )


def _top_users(view: UsageView) -> None:
    if not view.staff:
        return
    st.subheader("Top users")
    if not view.top_users:
        st.caption("Nobody spent anything in these days.")
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "user": r.label,
                    "spend": _money(r.actual_micro_usd),
                    "images": r.images,
                    "cost per image": _money(r.cost_per_image_micro_usd),
                    "attempts": r.attempts,
                    "success": _rate(r.success_rate),
                }
                for r in view.top_users
            ]
        ),
        hide_index=True,
        width="stretch",
    )


def _forecast_and_advice(view: UsageView) -> None:
    st.subheader("Budget forecast")
    if not view.forecasts:
        st.caption("No active budget applies here." if view.staff else "No budget of yours.")
    for f in view.forecasts:
        share = min(1.0, f.committed_micro_usd / f.limit_micro_usd) if f.limit_micro_usd else 1.0
        runs_out = f.runs_out_at.strftime("%Y-%m-%d %H:%M UTC") if f.runs_out_at else "not this period"
        st.progress(
            share,
            text=(
                f"{f.budget_name} ({f.period}, {f.mode}): {format_usd(f.committed_micro_usd)} of "
                f"{format_usd(f.limit_micro_usd)} committed; projected {format_usd(f.projected_micro_usd)} by "
                f"the period's end{' (over the limit)' if f.projected_over_limit else ''}; runs out: {runs_out}"
            ),
        )
    if view.optimizer is None:
        return
    st.subheader("Recommendations")
    report = view.optimizer
    st.caption(
        f"From {report.date_from} to {report.date_to} ({report.spend_mode}): {format_usd(report.spend_micro_usd)} "
        f"for {report.images:,} images, {_money(report.cost_per_image_micro_usd)} per image against a target "
        f"of {format_usd(report.target_cost_per_image_micro_usd)}."
    )
    if not report.recommendations:
        st.caption("Nothing to recommend: no cheaper setting found for this usage.")
    for rec in report.recommendations:
        with st.container(border=True):
            st.text(f"{rec.title} — saves about {format_usd(rec.monthly_saving_micro_usd)} a month")
            st.caption(rec.detail)


def _attempts(filters: UsageFilters, names: dict[int, str]) -> None:
    st.subheader("Recent attempts")
    status = st.selectbox("Status", ["", *STATUSES], format_func=lambda s: s or "any status", key="usage.status")
    signature = (filters, status)
    if st.session_state.get("usage.sig") != signature:
        st.session_state["usage.sig"] = signature
        st.session_state[PAGES] = [None]
    cursors: list[int | None] = st.session_state[PAGES]
    with state.db_session() as session:
        page = recent_attempts(session, actor, filters, status=status or None, before_id=cursors[-1], limit=50)
    if not page.attempts:
        st.caption("No attempts with these filters.")
    else:
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "started (UTC)": a.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                        "generation": a.generation_id,
                        "attempt": a.attempt_no,
                        "provider": a.provider,
                        "mode": a.mode,
                        "status": a.status,
                        "error class": a.error_class or "",
                        "billing": a.billing or "",
                        "estimate": format_usd(a.estimated_micro_usd),
                        "actual": "held" if a.actual_micro_usd is None else format_usd(a.actual_micro_usd),
                        "images": a.images_count,
                        "time": "—" if a.total_ms is None else f"{a.total_ms / 1000:,.2f} s",
                        "user": "system/CLI" if a.user_id is None else names.get(a.user_id, user.username),
                    }
                    for a in page.attempts
                ]
            ),
            hide_index=True,
            width="stretch",
        )
    newer, where, older = st.columns([1, 2, 1])
    if newer.button("Newer", disabled=len(cursors) <= 1, key="usage.newer"):
        cursors.pop()
        st.rerun()
    where.caption(f"Page {len(cursors)} (50 a page, newest first)")
    if older.button("Older", disabled=page.next_before_id is None, key="usage.older"):
        cursors.append(page.next_before_id)
        st.rerun()


st.title("Usage")
st.caption(
    "Spend and performance from the daily rollups (UTC days). "
    + ("Everyone's usage." if user.role is not Role.USER else "Your own usage only.")
)

try:
    with state.db_session() as session:
        names = user_choices(session, actor)
    filters = _filters(user.role is not Role.USER, names)
    if filters is not None:
        with state.db_session() as session:
            view = load_usage(session, actor, filters)
        _headline(view)
        _charts(view)
        st.download_button(
            "Download CSV",
            data=usage_csv(view),
            file_name=f"imagegate-usage-{filters.spend_mode}-{filters.date_from}-{filters.date_to}.csv",
            mime="text/csv",
            icon=":material/download:",
            key="usage.csv",
        )
        _top_users(view)
        _forecast_and_advice(view)
        _attempts(view.filters, names)
except ImagegateError as exc:
    st.error(str(exc))
