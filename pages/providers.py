"""Providers: each provider's key (masked), connection mode, breaker (state, reason, since, next probe), last
health probe, success rate and latency from the rollups, slots in flight and queued; "probe now" and a breaker
reset; in emulator mode, faults to inject so an admin can watch fallback and breakers act."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pandas as pd
import streamlit as st

from common.errors import InvalidInput, PermissionDenied
from core import emulator_faults
from core.generation import breaker
from core.generation.health import run_probes
from core.provider_status import RECENT_DAYS, ProviderStatus, provider_statuses
from core.providers.registry import emulator_url
from db.engine import transaction
from ui import state

user = state.require_user(state.STAFF)
LIVE_EVERY_S = 5

st.title("Providers")
st.caption(
    f"Health, circuit breakers and capacity, as every process on this database sees them. Success rate and latency "
    f"are from the daily rollups of the last {RECENT_DAYS} days, in each provider's current connection mode."
)


def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    seconds = (value - datetime.now(UTC)).total_seconds()
    stamp = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if abs(seconds) < 3600:
        ago = f"in {seconds:.0f} s" if seconds >= 0 else f"{-seconds:.0f} s ago"
        return f"{stamp} ({ago})"
    return stamp


def _short(value: datetime | None) -> str:
    """For the table: time of day (UTC), with the date only when it is not today."""
    if value is None:
        return "—"
    value = value.astimezone(UTC)
    return value.strftime("%H:%M:%S" if value.date() == datetime.now(UTC).date() else "%m-%d %H:%M")


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} ms"


with state.db_session() as session:
    statuses = provider_statuses(session)


def _table(rows: list[ProviderStatus]) -> None:
    table = pd.DataFrame(
        [
            {
                "id": s.provider,
                "mode": s.mode,
                "key": s.key,
                "health": s.health.value.replace("_", " "),
                "breaker": s.breaker.state.value.replace("_", "-"),
                "since (UTC)": _short(s.breaker.since),
                "next probe": _short(s.breaker.next_probe_at),
                "last probe": (
                    "—"
                    if s.breaker.last_probe_at is None
                    else f"{'ok' if s.breaker.last_probe_ok else 'failed'} {_short(s.breaker.last_probe_at)}"
                ),
                "success": "—" if s.success_rate is None else f"{s.success_rate:.0%} of {s.attempts}",
                "p50": _ms(s.p50_ms),
                "p95": _ms(s.p95_ms),
                "in flight": s.in_flight,
                "queued": s.queued,
            }
            for s in rows
        ]
    )
    st.dataframe(table, hide_index=True, width="stretch")


@st.fragment(run_every=LIVE_EVERY_S)
def _live_table() -> None:
    """The table alone, re-read every few seconds: watch breakers open and close while generations run."""
    with state.db_session() as session:
        _table(provider_statuses(session))


if st.toggle(f"Live: refresh the table every {LIVE_EVERY_S} s", key="providers_live"):
    _live_table()
else:
    _table(statuses)

left, right = st.columns([1, 3])
with left:
    if st.button("Probe all now", help="Run every provider's cheap, non-billable health probe now."):
        with st.spinner("Probing every provider…"):
            outcomes = asyncio.run(run_probes(state.runtime().sessions))
        state.flash("Probed: " + "; ".join(f"{o.provider} {'ok' if o.ok else 'failed'}" for o in outcomes))
        st.rerun()

for s in statuses:
    snap = s.breaker
    health = s.health.value.replace("_", " ")
    with st.expander(f"{s.label} — {s.mode}, breaker {snap.state.value.replace('_', '-')}, {health}"):
        info, actions = st.columns([3, 1])
        with info:
            st.text(f"key: {s.key}")
            st.text(f"health: {s.health_reason}")  # reasons can quote provider messages: text, never markup
            st.text(f"breaker: {snap.state.value} since {_when(snap.since)}")
            if snap.reason:
                st.text(f"reason: {snap.reason}")
            st.text(
                f"next probe: {_when(snap.next_probe_at)} · failures in a row: {snap.consecutive_failures} · "
                f"opened {snap.opened_count} time(s)"
            )
            if snap.window_current:
                st.text(f"current window: {snap.window_failures} of {snap.window_requests} requests failed")
            st.text(f"in flight: {s.in_flight} · queued: {s.queued}")
        with actions:
            if st.button("Probe now", key=f"probe-{s.provider}"):
                with st.spinner(f"Probing {s.label}…"):
                    (outcome,) = asyncio.run(run_probes(state.runtime().sessions, [s.provider]))
                state.flash(
                    f"{s.label}: probe {'ok' if outcome.ok else 'failed'} in {outcome.latency_s:.2f} s — "
                    f"{outcome.detail}"
                )
                st.rerun()
            if st.button(
                "Reset breaker",
                key=f"reset-{s.provider}",
                disabled=snap.state.value == "closed",
                help="Close the breaker by hand and clear its counters (audited).",
            ):
                try:
                    with transaction(state.runtime().sessions) as session:
                        breaker.reset(session, user.actor(), s.provider)
                except PermissionDenied as exc:
                    st.error(str(exc))
                else:
                    state.flash(f"{s.label}: breaker reset.")
                    st.rerun()

st.subheader("Fault injection")
if emulator_url() is None:
    st.info(
        "Fault injection is not available: the providers without a key run in the offline sandbox, which never "
        "fails. Start `imagegate emulator` and set IMAGEGATE_EMULATOR_URL for the console to make providers fail "
        "on purpose and watch fallback and the breakers act."
    )
else:
    try:
        boards = emulator_faults.read_faults()
    except InvalidInput as exc:
        st.error(str(exc))
        boards = {}
    if boards:
        emulated = [s for s in statuses if s.provider in boards]
        st.caption(
            f"The emulator at {emulator_url()} serves the providers in emulator mode. A fault makes each of the "
            "provider's next requests fail that way; generations then fall back to the next provider, and enough "
            "failures open the breaker (see above)."
        )
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "provider": b.provider,
                        "mode": next((s.mode for s in emulated if s.provider == b.provider), "—"),
                        "fault": b.fault or "none",
                        "requests left": "until cleared" if b.fault and b.remaining is None else (b.remaining or "—"),
                    }
                    for b in boards.values()
                ]
            ),
            hide_index=True,
            width="stretch",
        )
        with st.form("inject_fault", clear_on_submit=False):
            cols = st.columns(3)
            provider = cols[0].selectbox("Provider", list(boards))
            fault = cols[1].selectbox("Fault", sorted({f for b in boards.values() for f in b.supported}))
            count = cols[2].number_input(
                "For the next N requests (0 = until cleared)", min_value=0, max_value=10_000, value=0, step=1
            )
            inject = st.form_submit_button("Inject fault", type="primary")
        clear_cols = st.columns(len(boards))
        clear_clicked = [
            col.button(f"Clear {name}", key=f"clear-{name}", disabled=boards[name].fault is None)
            for col, name in zip(clear_cols, boards, strict=True)
        ]
        change: tuple[str, str | None, int | None] | None = None
        if inject:
            change = (str(provider), str(fault), int(count) or None)
        for name, clicked in zip(boards, clear_clicked, strict=True):
            if clicked:
                change = (name, None, None)
        if change is not None:
            try:
                with transaction(state.runtime().sessions) as session:
                    after = emulator_faults.inject_fault(session, user.actor(), *change)
            except (InvalidInput, PermissionDenied) as exc:
                st.error(str(exc))
            else:
                what = f"{after.fault}" + (f" for {after.remaining} request(s)" if after.remaining else "")
                state.flash(f"{after.provider}: {what if after.fault else 'faults cleared'}.")
                st.rerun()
