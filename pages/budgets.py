"""Budgets (ADMIN and HERO): each budget's period with spent, reserved, limit and forecast; create, edit, delete;
thresholds; hard or soft with the degrade action; period reset with its history; alerts (unread per user, mark
read) with their delivery status; webhooks (ADMIN) with "send test", the secret shown once, and the delivery log.

Widgets only: every change goes to core, which authorizes it from the database (core.generation.budgets,
core.spend.alerts, core.spend.webhooks; reads through core.budgets_view). Forms keep their input on errors and
show each message under its field. Names people typed are shown as text, never as markup."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from common.errors import Conflict, ImagegateError, InvalidInput, NotFound, PermissionDenied
from core.budgets_view import BudgetLine, budget_history, limit_from_text, load_budgets, thresholds_from_text
from core.catalog import PROVIDERS
from core.generation.budgets import DEGRADE_ACTIONS, create_budget, delete_budget, reset_period, update_budget
from core.money import format_usd, micros_to_usd
from core.providers.registry import default_spend_view
from core.security import Role
from core.spend import alerts, webhooks
from core.usage_view import user_choices
from db.engine import transaction
from db.models import BudgetScope, SpendMode
from ui import state
from ui.widgets import field_errors_at

user = state.require_user(state.STAFF)
actor = user.actor()

SECRET = "budgets.new_secret"  # a new webhook's signing secret, shown on the next run only
DEGRADE_LABELS = {
    "cheaper_preset": "use a cheaper preset",
    "smaller_size": "make a smaller image",
    "cheaper_provider": "use a cheaper provider",
}


def _act(
    action: Callable[[Any], object], slots: dict[str, DeltaGenerator] | None = None, *, done: str | None = None
) -> object | None:
    """Run one change in a transaction; on success say `done` (if given) and rerun; show a refusal under the
    fields when `slots` has them (the form keeps its input)."""
    try:
        with transaction(state.runtime().sessions) as session:
            result = action(session)
        if done is not None:
            _done(done)
        return result
    except InvalidInput as exc:
        left = field_errors_at(slots or {}, exc.field_errors or {})
        st.error(str(exc) if left or not exc.field_errors else "Please correct the fields marked above.")
    except (PermissionDenied, NotFound, Conflict, ImagegateError) as exc:
        st.error(str(exc))
    return None


def _done(message: str) -> None:
    state.flash(message)
    st.rerun()


def _scope_text(line: BudgetLine, names: dict[int, str]) -> str:
    b = line.budget
    if b.scope is BudgetScope.GLOBAL:
        return "everyone"
    if b.scope is BudgetScope.PROVIDER:
        return f"provider {b.scope_id}"
    uid = int(b.scope_id or 0)
    return f"user {names.get(uid, uid)}"


def _kind_text(line: BudgetLine) -> str:
    b = line.budget
    if b.hard:
        return "hard: refuses what would go over"
    return f"soft: over the limit, {DEGRADE_LABELS.get(b.degrade_action or '', b.degrade_action or '')}"


def _bars(line: BudgetLine) -> None:
    f = line.figures
    limit = f.limit_micro_usd
    used = f.spent_micro_usd + f.reserved_micro_usd
    st.progress(
        min(1.0, used / limit) if limit else 1.0,
        text=(
            f"spent {format_usd(f.spent_micro_usd)} + reserved {format_usd(f.reserved_micro_usd)} of "
            f"{format_usd(limit)} ({used / limit:.0%}); left {format_usd(f.left_micro_usd)}"
        ),
    )
    forecast = line.forecast
    if forecast is not None:
        runs_out = forecast.runs_out_at.strftime("%Y-%m-%d %H:%M UTC") if forecast.runs_out_at else "not this period"
        st.progress(
            min(1.0, forecast.projected_micro_usd / limit) if limit else 1.0,
            text=(
                f"forecast by {forecast.period_end:%Y-%m-%d %H:%M} UTC: {format_usd(forecast.projected_micro_usd)}"
                f"{' — over the limit' if forecast.projected_over_limit else ''}; runs out: {runs_out}"
            ),
        )


def _edit_form(line: BudgetLine) -> None:
    b = line.budget
    key = f"budgets.edit.{b.id}"
    if b.settings_provider is not None:
        st.caption(f"This is {b.settings_provider}'s daily cost limit: change it on the Settings page.")
        return
    with st.form(key, clear_on_submit=False):
        slots: dict[str, DeltaGenerator] = {}
        name = st.text_input("Name", b.name, key=f"{key}.name")
        slots["name"] = st.empty()
        limit_text = st.text_input("Limit (USD)", str(micros_to_usd(b.limit_micro_usd).normalize()), key=f"{key}.limit")
        slots["limit_micro_usd"] = st.empty()
        hard = st.toggle("Hard (refuse)", b.hard, key=f"{key}.hard", help="Off: soft, the degrade action applies.")
        actions = list(DEGRADE_ACTIONS)
        degrade = st.selectbox(
            "Degrade action (soft budgets)",
            actions,
            index=actions.index(b.degrade_action) if b.degrade_action in actions else 0,
            format_func=DEGRADE_LABELS.__getitem__,
            key=f"{key}.degrade",
        )
        slots["degrade_action"] = st.empty()
        active = st.toggle("Active", b.active, key=f"{key}.active")
        levels = st.text_input(
            "Alert thresholds (% of the limit)",
            ", ".join(map(str, line.thresholds)),
            key=f"{key}.thresholds",
            help="Comma-separated, e.g. 50, 80, 100; empty: no threshold alerts.",
        )
        slots["thresholds"] = st.empty()
        saved = st.form_submit_button("Save changes", type="primary")
    if not saved:
        return

    def change(session: Any) -> object:
        micros = limit_from_text(limit_text)
        wanted = thresholds_from_text(levels)
        update_budget(
            session,
            actor,
            b.id,
            name=name,
            limit_micro_usd=micros,
            hard=hard,
            degrade_action=None if hard else degrade,
            active=active,
        )
        if tuple(wanted) != line.thresholds or line.default_thresholds:
            alerts.set_thresholds(session, actor, b.id, wanted)
        return True

    _act(change, slots, done=f"Budget {name.strip()!r} saved.")


def _danger_zone(line: BudgetLine, mode: SpendMode) -> None:
    b = line.budget
    key = f"budgets.danger.{b.id}"
    sure = st.checkbox("I am sure", key=f"{key}.sure", help="Resetting or deleting cannot be undone.")
    a, c = st.columns(2)
    if a.button(f"Reset this period ({mode.value})", key=f"{key}.reset", disabled=not sure):
        _act(
            lambda s: reset_period(s, actor, b.id, mode),
            done=f"The current {mode.value} period of {b.name!r} was reset; the old figures are in its history.",
        )
    if b.settings_provider is None and c.button("Delete budget", key=f"{key}.delete", disabled=not sure):
        _act(
            lambda s: delete_budget(s, actor, b.id),
            done=f"Budget {b.name!r} deleted (its history stays in the ledger).",
        )


def _history(line: BudgetLine) -> None:
    with state.db_session() as session:
        _, periods = budget_history(session, actor, line.budget.id)
    if not periods:
        st.caption("No period yet: the first reservation opens one.")
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "period start (UTC)": p.period_start.strftime("%Y-%m-%d %H:%M"),
                    "mode": p.mode.value,
                    "spent": format_usd(p.spent_micro_usd),
                    "reserved": format_usd(p.reserved_micro_usd),
                    "limit": format_usd(p.limit_micro_usd),
                    "closed": "reset " + p.reset_at.strftime("%Y-%m-%d %H:%M") if p.reset_at else "",
                }
                for p in periods
            ]
        ),
        hide_index=True,
        width="stretch",
    )


def _budget(line: BudgetLine, mode: SpendMode, names: dict[int, str]) -> None:
    b = line.budget
    with st.container(border=True):
        head, tag = st.columns([4, 1])
        head.text(b.name)
        tag.caption("active" if b.active else "inactive")
        st.caption(
            f"{b.period.value} · {_scope_text(line, names)} · {_kind_text(line)} · alerts at "
            f"{', '.join(f'{t}%' for t in line.thresholds) or 'none'}"
        )
        _bars(line)
        with st.expander("Edit, thresholds, reset, delete"):
            _edit_form(line)
            _danger_zone(line, mode)
        with st.expander("Period history"):
            _history(line)


def _create_form(names: dict[int, str]) -> None:
    st.subheader("New budget")
    scope = st.radio(
        "Applies to",
        [s.value for s in BudgetScope],
        horizontal=True,
        key="budgets.new.scope",
        format_func={"global": "everyone", "provider": "one provider", "user": "one user"}.__getitem__,
    )
    with st.form("budgets.new", clear_on_submit=False):
        slots: dict[str, DeltaGenerator] = {}
        name = st.text_input("Name", key="budgets.new.name", placeholder="e.g. Marketing monthly")
        slots["name"] = st.empty()
        scope_id: str | None = None
        if scope == "provider":
            scope_id = st.selectbox("Provider", list(PROVIDERS), key="budgets.new.provider")
        elif scope == "user":
            ids = sorted(names, key=names.__getitem__)
            picked = st.selectbox("User", ids, format_func=names.__getitem__, key="budgets.new.user")
            scope_id = None if picked is None else str(picked)
        slots["scope_id"] = st.empty()
        period = st.selectbox("Period", ["monthly", "daily"], key="budgets.new.period", help="Calendar-aligned in UTC.")
        slots["period"] = st.empty()
        limit_text = st.text_input("Limit (USD)", key="budgets.new.limit", placeholder="e.g. 25 or 0.50")
        slots["limit_micro_usd"] = st.empty()
        hard = st.toggle("Hard (refuse)", True, key="budgets.new.hard", help="Off: soft, the degrade action applies.")
        degrade = st.selectbox(
            "Degrade action (soft budgets)",
            list(DEGRADE_ACTIONS),
            format_func=DEGRADE_LABELS.__getitem__,
            key="budgets.new.degrade",
        )
        slots["degrade_action"] = st.empty()
        levels = st.text_input(
            "Alert thresholds (% of the limit)", "50, 80, 100", key="budgets.new.thresholds", help="Empty: none."
        )
        slots["thresholds"] = st.empty()
        submitted = st.form_submit_button("Create budget", type="primary")
    if not submitted:
        return

    def create(session: Any) -> object:
        micros = limit_from_text(limit_text)
        wanted = thresholds_from_text(levels)
        made = create_budget(
            session,
            actor,
            name=name,
            scope=scope,
            scope_id=scope_id,
            period=period,
            limit_micro_usd=micros,
            hard=hard,
            degrade_action=None if hard else degrade,
        )
        alerts.set_thresholds(session, actor, made.id, wanted)
        return made

    _act(create, slots, done=f"Budget {name.strip()!r} created.")


def _alerts() -> None:
    with state.db_session() as session:
        unread = alerts.unread_count(session, actor)
        shown = alerts.list_alerts(session, actor, limit=20)
    st.subheader(f"Alerts ({unread} unread)")
    if not shown:
        st.caption("No alert yet: thresholds, breakers that open and unusual spend raise one.")
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "": "" if a.read else "●",
                    "fired (UTC)": a.fired_at.strftime("%Y-%m-%d %H:%M"),
                    "alert": a.title,
                    "kind": a.kind.value,
                    "webhooks": a.delivery_status,
                }
                for a in shown
            ]
        ),
        hide_index=True,
        width="stretch",
    )
    unread_shown = [a for a in shown if not a.read]
    left, right = st.columns(2)
    if unread_shown:
        picked = left.multiselect(
            "Mark as read",
            [a.id for a in unread_shown],
            format_func={a.id: f"{a.fired_at:%m-%d %H:%M} {a.title}" for a in unread_shown}.__getitem__,
            key="budgets.alerts.pick",
        )
        if left.button("Mark read", key="budgets.alerts.mark", disabled=not picked):
            _act(lambda s: alerts.mark_read(s, actor, picked), done=f"{len(picked)} alert(s) marked read.")
    if unread and right.button("Mark all read", key="budgets.alerts.all"):
        _act(lambda s: alerts.mark_all_read(s, actor), done="Every alert marked read.")


def _webhooks() -> None:
    st.subheader("Webhooks")
    if user.role is not Role.ADMIN:
        st.caption("Webhooks are managed by admins.")
        return
    secret = st.session_state.pop(SECRET, None)
    if secret is not None:
        st.warning("The new webhook's signing secret, shown this once: copy it now.")
        st.code(secret, language=None)
    with state.db_session() as session:
        hooks = webhooks.list_webhooks(session, actor)
        log = webhooks.list_deliveries(session, actor, limit=20)
    for hook in hooks:
        with st.container(border=True):
            st.text(f"{hook.name} → {webhooks.display_url(hook.url)}")
            st.caption(
                f"{'active' if hook.active else 'disabled'} · events: {', '.join(hook.events) or 'every event'} · "
                f"secret: {hook.secret_source}"
            )
            a, b, c = st.columns(3)
            if a.button("Send test", key=f"budgets.hook.{hook.id}.test", disabled=not hook.active):
                _act(
                    partial(webhooks.send_test, actor=actor, webhook_id=hook.id),
                    done=f"Test queued for {hook.name!r}: the delivery log shows how it went.",
                )
            label = "Disable" if hook.active else "Enable"
            if b.button(label, key=f"budgets.hook.{hook.id}.active"):
                _act(
                    partial(webhooks.set_active, actor=actor, webhook_id=hook.id, active=not hook.active),
                    done=f"Webhook {hook.name!r} {'enabled' if not hook.active else 'disabled'}.",
                )
            if c.button("Delete", key=f"budgets.hook.{hook.id}.delete"):
                _act(
                    partial(webhooks.delete_webhook, actor=actor, webhook_id=hook.id),
                    done=f"Webhook {hook.name!r} deleted.",
                )
    with st.expander("Add a webhook"), st.form("budgets.hook.new", clear_on_submit=False):
        slots: dict[str, DeltaGenerator] = {}
        name = st.text_input("Name", key="budgets.hook.name")
        slots["name"] = st.empty()
        url = st.text_input("URL", key="budgets.hook.url", placeholder="https://hooks.example.com/imagegate")
        slots["url"] = st.empty()
        events = st.multiselect("Events (none: every event)", list(webhooks.EVENT_TYPES), key="budgets.hook.events")
        slots["events"] = st.empty()
        env_var = st.text_input(
            "Secret from an environment variable (optional)",
            key="budgets.hook.env",
            help="Its name, not the secret. Empty: a secret is generated and shown once.",
        )
        slots["secret_env_var"] = st.empty()
        added = st.form_submit_button("Add webhook")
    if added:
        made = _act(
            lambda s: webhooks.create_webhook(
                s, actor, name=name, url=url, events=events, secret_env_var=env_var.strip() or None
            ),
            slots,
        )
        if isinstance(made, webhooks.CreatedWebhook):
            if made.secret is not None:
                st.session_state[SECRET] = made.secret
            _done(f"Webhook {made.webhook.name!r} added.")
    st.caption("Delivery log (newest first)")
    if not log:
        st.caption("Nothing delivered yet.")
        return
    names = {h.id: h.name for h in hooks}
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "created (UTC)": d.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    "webhook": names.get(d.webhook_id, d.webhook_id),
                    "event": d.event_type,
                    "status": d.status,
                    "attempts": d.attempts,
                    "response": d.response_code or "",
                    "time": "" if d.response_ms is None else f"{d.response_ms} ms",
                    "error": d.last_error or "",
                }
                for d in log
            ]
        ),
        hide_index=True,
        width="stretch",
    )


st.title("Budgets")
st.caption(
    "Spent and reserved this period against each limit, with the forecast to the period's end. Live money and "
    "simulated (emulator, sandbox) runs are separate periods, never added together."
)
modes = [m.value for m in SpendMode]
mode = SpendMode(
    st.radio("Spend", modes, index=modes.index(default_spend_view()), horizontal=True, key="budgets.mode")
)
try:
    with state.db_session() as session:
        lines = load_budgets(session, actor, mode)
        people = user_choices(session, actor)
except ImagegateError as exc:
    st.error(str(exc))
    st.stop()

budgets_tab, alerts_tab, hooks_tab = st.tabs(["Budgets", "Alerts", "Webhooks"])
with budgets_tab:
    if not lines:
        st.info("No budget yet: create one below.")
    for line in lines:
        _budget(line, mode, people)
    _create_form(people)
with alerts_tab:
    _alerts()
with hooks_tab:
    _webhooks()
