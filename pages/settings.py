"""Settings: every provider at a glance; one provider's parameters and routing edited with the effective values
and the cost of one image updating as you type; global settings and presets; prices; import and export.
Every save is a new version (history, side-by-side diff, rollback). Every rule is core's."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pandas as pd
import streamlit as st

from common.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from core import price_store, settings_service, transfer
from core.catalog import COMMON_PARAMS, PROVIDERS
from core.generation.health import health_report
from core.overview import provider_overviews
from core.presets import PRESET_LABELS, PRESET_NAMES, preset_params, presets_for
from core.settings import GlobalSettings, ProviderSettings
from core.settings_editor import (
    change_cost_preview,
    check_draft,
    check_global_draft,
    check_price_draft,
    draft_params,
    global_draft_with,
    global_fields,
    inherited_values,
    number_from_text,
    preset_overrides_draft,
    preset_param_names,
    price_draft,
)
from db.engine import transaction
from ui import state
from ui.widgets import changes_table, field_errors_at, param_input, save_button

user = state.require_user(state.STAFF)
actor = user.actor()
SAVE_ERRORS = (InvalidInput, Conflict, PermissionDenied, NotFound)


def _write(action: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one core change in its own transaction; show its refusal and return None."""
    try:
        with transaction(state.runtime().sessions) as session:
            return action(session, actor, *args, **kwargs)
    except SAVE_ERRORS as exc:
        st.error(str(exc))
        for name, message in getattr(exc, "field_errors", {}).items():
            st.caption(f"{name}: {message}")
        return None


def _loaded(form: str, current: int, what: str) -> int:
    """The version a form started from (kept in this session, so someone else's save never wipes what is typed
    here); when a newer one exists, say so and offer to start again from it."""
    loaded: int = st.session_state.setdefault(f"{form}.loaded", current)
    if loaded != current:
        st.warning(
            f"Someone saved version {current} of {what} after you started editing version {loaded}: saving this "
            "form would be refused. Reload to start again from the current version."
        )
        if st.button("Reload the form", key=f"{form}.reload"):
            st.session_state[f"{form}.loaded"] = current
            st.rerun()
    return loaded


def _optional(column: Any, label: str, value: object, key: str, help_text: str) -> str:
    """A value that may be left empty (not set), typed as text; amounts keep their exact decimal form."""
    shown = "" if value is None else format(value, "f") if isinstance(value, Decimal) else str(value)
    text: str = column.text_input(label, shown, key=key, help=help_text, placeholder="not set")
    return text


def _field_label(name: str) -> str:
    """A setting's name as a label: `request_timeout_s` -> "Request timeout (s)"."""
    for suffix, unit in (("_usd", " (USD)"), ("_s", " (s)")):
        if name.endswith(suffix):
            return name.removesuffix(suffix).replace("_", " ").capitalize() + unit
    return name.replace("_", " ").capitalize()


def _when(moment: datetime | None) -> str:
    return "—" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _history_table(history: list[settings_service.SettingsVersion]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "version": v.version,
                "saved": _when(v.created_at),
                "by": v.created_by_name,
                "comment": v.comment or "",
                "deleted": v.deleted,
                "rollback of": "" if v.source_version is None else f"version {v.source_version}",
            }
            for v in history
        ]
    )


def _history(kind: str, history: list[settings_service.SettingsVersion], key: str) -> int | None:
    """The versions, two of them side by side, and the version picked to roll back to (None: no rollback)."""
    st.subheader("History")
    if not history:
        st.caption("Nothing saved yet.")
        return None
    st.dataframe(_history_table(history), hide_index=True, width="stretch")
    versions = [v.version for v in history]
    by_version = {v.version: v for v in history}
    left, right = st.columns(2)
    latest = f"{key}.{versions[0]}"  # a new version resets the comparison to it and the one before
    older = left.selectbox("Compare version", versions, index=min(1, len(versions) - 1), key=f"{latest}.a")
    newer = right.selectbox("with version", versions, index=0, key=f"{latest}.b")
    diff = settings_service.diff_settings(by_version[older].settings, by_version[newer].settings)
    if diff:
        st.dataframe(changes_table(diff, f"version {older}", f"version {newer}"), hide_index=True, width="stretch")
    else:
        st.caption(f"Versions {older} and {newer} of the {kind} settings are the same.")
    earlier = [v for v in versions[1:] if not by_version[v].deleted]
    if not earlier:
        return None
    pick, go = st.columns([3, 1], vertical_alignment="bottom")
    target = pick.selectbox("Roll back to version", earlier, key=f"{key}.rollback")
    return target if go.button("Roll back", key=f"{key}.rollback.go") else None


st.title("Provider settings")
st.caption(
    "Values come from the catalog defaults, the global settings, the provider's own settings and, per request, "
    "a preset and overrides; the *from* column says which. Every save is a new version."
)


@st.fragment
def _provider_editor() -> None:
    """A fragment, like each tab: its widgets rerun only their part of the page (a slider moves quickly).
    One provider: picker, parameters and routing with errors at each field, the live preview, save, history."""
    with state.db_session() as session:
        overviews = provider_overviews(session)
        health = {h.provider: h for h in health_report(session)}
        by_id = {o.provider: o for o in overviews}

        def _label(provider_id: str) -> str:
            o = by_id[provider_id]
            cost = o.one_image.formatted if o.one_image else "no price"
            status = health[provider_id].status.value.replace("_", " ")
            return f"{o.spec.label} · {cost}/image · {o.connection.mode.value} · {status}"

        provider = st.selectbox("Provider", list(by_id), format_func=_label, key="settings.provider")
        overview = by_id[provider]
        spec = PROVIDERS[provider]
        current = overview.settings or ProviderSettings.defaults(provider)
        version = overview.settings_version or 0
        inherited = inherited_values(session, provider)
        loaded = _loaded(f"ps.{provider}", version, "these settings")
        key = f"ps.{provider}.{loaded}."  # keyed by the version the form started from: it keeps its input
        st.caption(f"{spec.description} Settings version {version or 'none yet (catalog defaults)'}.")
        for problem in overview.problems:
            st.warning(problem)

        form, preview = st.columns([5, 4], gap="large")
        # Save sits first in the preview column: nothing above it changes size as the draft changes. A value typed
        # and not yet applied is applied by the click on Save itself; if that rerun moved the button, the click
        # would land beside it.
        save_bar = preview.container()
        slots: dict[str, Any] = {}
        shown: dict[str, Any] = {}
        with form:
            for title, names in (
                ("Generation", [n for n in spec.params if n in COMMON_PARAMS]),
                (f"{spec.label} only", [n for n in spec.params if n not in COMMON_PARAMS]),
            ):
                if not names:
                    continue
                st.markdown(f"**{title}**")
                for name in names:
                    where = "Set here." if name in current.params else f"Inherited ({inherited.get(name)!r})."
                    value = current.params.get(name, inherited.get(name))
                    shown[name] = param_input(spec.params[name], value, key + name, help_suffix=where)
                    slots[f"params.{name}"] = st.empty()
            st.markdown("**Routing and limits**")
            a, b = st.columns(2)
            priority = a.number_input(
                "Priority", value=current.priority, step=1, key=key + "priority", help="Higher is tried first (0-1000)."
            )
            slots["priority"] = a.empty()
            daily = _optional(
                b,
                "Daily cost limit (USD)",
                current.daily_cost_limit_usd,
                key + "daily",
                "Empty: no limit. A hard daily budget for this provider.",
            )
            slots["daily_cost_limit_usd"] = b.empty()
            timeout = _optional(
                a, "Request timeout (s)", current.request_timeout_s, key + "timeout", "Empty: the global setting."
            )
            slots["request_timeout_s"] = a.empty()
            in_flight = _optional(
                b,
                "Max in flight",
                current.max_in_flight,
                key + "inflight",
                "Requests at once across every process. Empty: the catalog's limit.",
            )
            slots["max_in_flight"] = b.empty()
            c, d, e = st.columns(3)
            active = c.toggle("Active", current.active, key=key + "active")
            slots["active"] = c.empty()
            is_default = d.toggle("Default provider", current.is_default, key=key + "default")
            slots["is_default"] = d.empty()
            auto = e.toggle(
                "Automatic routing",
                current.auto_routing,
                key=key + "auto",
                help="May routing pick it when a request names no provider?",
            )
            slots["auto_routing"] = e.empty()

        draft: dict[str, Any] = {
            "provider": provider,
            "params": draft_params(current.params, inherited, shown),
            "priority": int(priority),
            "active": active,
            "is_default": is_default,
            "auto_routing": auto,
            "daily_cost_limit_usd": daily.strip() or None,
            "request_timeout_s": number_from_text(timeout, "float"),
        }
        limit_typed = number_from_text(in_flight, "int")
        if limit_typed is not None:
            draft["max_in_flight"] = limit_typed
        check = check_draft(session, provider, draft)
        unplaced = field_errors_at(slots, check.field_errors)

        with preview:
            st.markdown("**Preview: what a request runs with**")
            one, whole = st.columns(2)
            one.metric("One image at these settings", check.one_image.formatted if check.one_image else "—")
            count = check.effective.value_of("num_images") if check.effective is not None else 1
            whole.metric(
                f"A request ({count} image{'s' if count != 1 else ''})",
                check.request_cost.formatted if check.request_cost else "—",
            )
            if check.request_cost is not None:
                st.caption(" · ".join(check.request_cost.breakdown))
            if check.valid:
                cost_change = change_cost_preview(
                    session,
                    provider,
                    draft,
                    spend_mode="live" if overview.connection.mode.value == "live" else "simulated",
                )
                st.metric(
                    "What this change costs per month",
                    cost_change.headline,
                    help="The optimizer's estimate at the last 30 days' volume of this provider, before saving.",
                )
                st.caption(cost_change.detail)
            for message in (*unplaced, *check.problems):
                st.error(message)
            if check.effective is not None:
                st.dataframe(pd.DataFrame(check.rows()), hide_index=True, width="stretch")
                for note in check.effective.notes:
                    st.info(note)
        with save_bar:
            comment = st.text_input("Comment for this version", key=key + "comment", max_chars=2000)
            if save_button("Save as a new version", key=key + "save", valid=check.valid, changed=bool(check.changes)):
                saved = _write(
                    settings_service.save_provider_settings,
                    provider,
                    draft,
                    comment=comment or None,
                    expected_version=loaded,
                )
                if saved is not None:
                    st.session_state[f"ps.{provider}.loaded"] = saved.version
                    state.flash(f"Saved {spec.label} settings as version {saved.version}.")
                    st.rerun()
            _show_unsaved(check.changes)

        if overview.settings is not None:
            with st.expander(f"Delete {spec.label}'s settings"):
                st.caption(
                    "Removes this provider's configuration (it is no longer routed to); the history is kept and a "
                    "rollback restores it."
                )
                if current.is_default:
                    st.info(
                        f"{spec.label} is the default provider: make another provider the default before deleting "
                        "its settings."
                    )
                sure = st.checkbox(
                    f"Yes, delete {spec.label}'s settings", key=key + "delete.confirm", disabled=current.is_default
                )
                if st.button(
                    "Delete settings", key=key + "delete", disabled=current.is_default or not sure, type="secondary"
                ):
                    removed = _write(settings_service.delete_provider_settings, provider)
                    if removed is not None:
                        st.session_state[f"ps.{provider}.loaded"] = removed.version
                        state.flash(f"Deleted {spec.label}'s settings (version {removed.version}).")
                        st.rerun()

        target = _history("provider", settings_service.provider_history(session, provider, limit=50), f"ph.{provider}")
        if target is not None:
            rolled = _write(settings_service.rollback_provider_settings, provider, target)
            if rolled is not None:
                st.session_state[f"ps.{provider}.loaded"] = rolled.version
                state.flash(f"Rolled {spec.label} back to version {target}: now version {rolled.version}.")
                st.rerun()


def _unsaved_global(saved: GlobalSettings, draft: GlobalSettings | None) -> list[settings_service.FieldChange]:
    """What saving a valid global-settings draft would change (nothing when invalid)."""
    if draft is None:
        return []
    return settings_service.diff_settings(settings_service.settings_json(saved), settings_service.settings_json(draft))


def _show_unsaved(changes: Sequence[settings_service.FieldChange]) -> None:
    """A form's unsaved changes, shown below its Save button: a table that grows above the button would move it
    under a click that is on its way (the click that applies a typed value and saves it)."""
    if changes:
        st.markdown("**Not saved yet**")
        st.dataframe(changes_table(changes, "saved", "this form"), hide_index=True, width="stretch")


def _save_global(draft: dict[str, Any], comment: str, expected_version: int, said: str) -> None:
    """Save `draft` as the next global settings version (refused when someone saved since `expected_version`);
    on success remember the version, flash `said` (with `{version}`) and rerun."""
    saved = _write(
        settings_service.save_global_settings, draft, comment=comment or None, expected_version=expected_version
    )
    if saved is not None:
        st.session_state["gs.loaded"] = saved.version
        state.flash(said.format(version=saved.version))
        st.rerun()


@st.fragment
def _global_editor() -> None:
    """The global settings (every field, grouped), their history, and the quality presets."""
    with state.db_session() as session:
        gview = settings_service.get_global_settings(session)
        gloaded = _loaded("gs", gview.version, "the global settings")
        gkey = f"gs.{gloaded}."
        st.caption(
            f"Global settings version {gview.version or 'none yet (built-in defaults)'}. Generation defaults apply "
            "to every provider that has the parameter (clamped to its range); empty means not set."
        )
        gslots: dict[str, Any] = {}
        gdraft: dict[str, Any] = {}
        fields = global_fields()
        for group in dict.fromkeys(f.group for f in fields):
            st.markdown(f"**{group}**")
            columns = st.columns(3)
            for i, fld in enumerate(f for f in fields if f.group == group):
                now = getattr(gview.settings, fld.name)
                with columns[i % 3]:
                    label = _field_label(fld.name)
                    fkey = gkey + fld.name
                    if fld.kind == "bool":
                        gdraft[fld.name] = st.toggle(label, bool(now), key=fkey, help=fld.help or None)
                    elif fld.kind == "optional_bool":
                        options = ["not set", "on", "off"]
                        picked = st.selectbox(
                            label,
                            options,
                            index=0 if now is None else (1 if now else 2),
                            key=fkey,
                            help=fld.help or None,
                        )
                        gdraft[fld.name] = None if picked == "not set" else picked == "on"
                    elif fld.kind == "choice":
                        options = list(fld.choices)
                        shown_now = now if now in options else options[0]
                        picked = st.selectbox(
                            label, options, index=options.index(shown_now), key=fkey, help=fld.help or None
                        )
                        gdraft[fld.name] = None if picked == "none" else picked
                    elif fld.kind == "many":
                        gdraft[fld.name] = st.multiselect(
                            label, list(fld.choices), default=list(now), key=fkey, help=fld.help or None
                        )
                    elif fld.kind in ("int", "float"):
                        text = st.text_input(
                            label,
                            "" if now is None else str(now),
                            key=fkey,
                            help=fld.help or None,
                            placeholder="not set",
                        )
                        typed = number_from_text(text, "int" if fld.kind == "int" else "float")
                        if typed is not None or now is None:
                            gdraft[fld.name] = typed
                        else:
                            gdraft[fld.name] = text  # a required number left empty: core says so at the field
                    else:
                        text = st.text_input(
                            label,
                            "" if now is None else str(now),
                            key=fkey,
                            help=fld.help or None,
                            placeholder="not set",
                        )
                        gdraft[fld.name] = text.strip() or None
                    gslots[fld.name] = st.empty()
        gdraft = {k: v for k, v in gdraft.items() if v is not None}
        if gview.settings.preset_overrides:  # edited in the presets table below; kept by this form
            gdraft["preset_overrides"] = gview.settings.preset_overrides
        gsettings, gerrors = check_global_draft(gdraft)
        for message in field_errors_at(gslots, gerrors):
            st.error(message)
        gchanges = _unsaved_global(gview.settings, gsettings)
        gcomment = st.text_input("Comment for this version", key=gkey + "comment", max_chars=2000)
        if save_button("Save global settings", key=gkey + "save", valid=gsettings is not None, changed=bool(gchanges)):
            _save_global(gdraft, gcomment, gloaded, "Saved the global settings as version {version}.")
        _show_unsaved(gchanges)
        gtarget = _history("global", settings_service.global_history(session, limit=50), "gh")
        if gtarget is not None:
            grolled = _write(settings_service.rollback_global_settings, gtarget)
            if grolled is not None:
                st.session_state["gs.loaded"] = grolled.version
                state.flash(f"Rolled the global settings back to version {gtarget}: now version {grolled.version}.")
                st.rerun()

        _presets_editor(gview, gloaded)


def _presets_editor(gview: settings_service.GlobalSettingsView, gloaded: int) -> None:
    """The quality presets: every value per provider (edits marked), and one provider's values edited per
    preset, saved as a new version of the global settings (`preset_overrides`)."""
    st.subheader("Quality presets")
    st.caption(
        "What each preset sets per provider, applied after the provider's settings and before a request's own "
        "values. Presets never change size or count (those decide the bill). The preset a request gets when "
        "it names none is the global *default preset* above. Edits are part of the global settings: versioned, "
        "audited and rolled back with them."
    )
    overrides = gview.settings.preset_overrides
    preset_rows = []
    for provider_id in PROVIDERS:
        for name, values in presets_for(provider_id, overrides).items():
            edited = gview.settings.preset_values(name, provider_id)
            preset_rows.append(
                {
                    "provider": provider_id,
                    "preset": PRESET_LABELS[name],
                    "sets": ", ".join(f"{k}={v}{' (edited)' if k in edited else ''}" for k, v in values.items())
                    or "nothing",
                }
            )
    st.dataframe(
        pd.DataFrame(preset_rows).pivot(index="provider", columns="preset", values="sets")[
            [PRESET_LABELS[p] for p in PRESET_NAMES]
        ],
        width="stretch",
    )
    st.markdown("**Edit the presets**")
    provider = st.selectbox(
        "Presets for provider", list(PROVIDERS), format_func=lambda p: PROVIDERS[p].label, key="presets.provider"
    )
    spec = PROVIDERS[provider]
    pkey = f"presets.{gloaded}.{provider}."  # a new global version starts the form again from it
    names = preset_param_names(provider)
    values_now = presets_for(provider, overrides)
    shown: dict[str, dict[str, Any]] = {}
    slots: dict[str, Any] = {}
    for column, preset in zip(st.columns(len(PRESET_NAMES)), PRESET_NAMES, strict=True):
        with column:
            st.markdown(f"*{PRESET_LABELS[preset]}*")
            edited = gview.settings.preset_values(preset, provider)
            shown[preset] = {}
            for name in names:
                builtin = preset_params(preset, provider).get(name, spec.params[name].default)
                where = "Edited." if name in edited else "Built-in."
                shown[preset][name] = param_input(
                    spec.params[name],
                    values_now[preset].get(name, builtin),
                    f"{pkey}{preset}.{name}",
                    help_suffix=f"{where} Built-in value: {builtin!r}.",
                )
                slots[f"preset_overrides.{preset}.{provider}.{name}"] = st.empty()
    new_overrides = preset_overrides_draft(overrides, provider, shown)
    psettings, perrors = check_global_draft(global_draft_with(gview.settings, preset_overrides=new_overrides))
    for message in field_errors_at(slots, perrors):
        st.error(message)
    pchanges = _unsaved_global(gview.settings, psettings)
    pcomment = st.text_input("Comment for this version", key=pkey + "comment", max_chars=2000)
    save, reset_one, reset_all = st.columns(3)
    plan: tuple[dict[str, Any], str] | None = None
    if save_button(
        "Save presets", key=pkey + "save", valid=psettings is not None, changed=bool(pchanges), where=save
    ):
        plan = (new_overrides, f"Saved {spec.label}'s presets")
    has_own = any(provider in by_provider for by_provider in overrides.values())
    if reset_one.button(f"Reset {spec.label} to built-in", disabled=not has_own, key=pkey + "reset"):
        plan = (preset_overrides_draft(overrides, provider, {}), f"Reset {spec.label}'s presets to built-in")
    if reset_all.button("Reset every preset to built-in", disabled=not overrides, key=pkey + "reset.all"):
        plan = ({}, "Reset every preset to built-in")
    _show_unsaved(pchanges)
    if plan is not None:
        draft = global_draft_with(gview.settings, preset_overrides=plan[0])
        _save_global(draft, pcomment, gloaded, plan[1] + ": global settings version {version}.")


@st.fragment
def _prices_editor() -> None:
    """One provider's price versions and a form to add the next one."""
    with state.db_session() as session:
        price_provider = st.selectbox(
            "Provider", list(PROVIDERS), format_func=lambda p: PROVIDERS[p].label, key="prices.provider"
        )
        versions = price_store.list_price_versions(session, price_provider)
        in_force = price_store.active_price(session, price_provider)
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "version": v.version,
                        "in force": in_force is not None and v.id == in_force.id,
                        "price": v.price.describe(),
                        "effective from": v.price.effective_date.isoformat(),
                        "source": v.price.source,
                        "entered by": v.created_by_name,
                        "entered": _when(v.created_at),
                        "comment": v.comment or "",
                    }
                    for v in versions
                ],
                columns=[
                    "version",
                    "in force",
                    "price",
                    "effective from",
                    "source",
                    "entered by",
                    "entered",
                    "comment",
                ],
            ),
            hide_index=True,
            width="stretch",
        )
        st.markdown("**Add a price version**")
        base: dict[str, Any] = (
            price_store.price_json(versions[0].price) if versions else {"provider": price_provider, "unit": "image"}
        )
        pkey = f"pv.{price_provider}.{versions[0].version if versions else 0}."
        pslots: dict[str, Any] = {}
        changes: dict[str, Any] = {}
        p1, p2 = st.columns(2)
        with p1:
            keyed: dict[str, Any] = dict(base.get("keyed_usd_per_unit") or {})
            if keyed:
                changes["keyed_usd_per_unit"] = {
                    k: st.text_input(
                        f"USD per {base.get('unit')} ({base.get('key_param')}={k})", str(v), key=pkey + "keyed." + k
                    )
                    for k, v in keyed.items()
                }
                pslots["keyed_usd_per_unit"] = st.empty()
            elif base.get("unit") != "free":
                changes["usd_per_unit"] = st.text_input(
                    f"USD per {base.get('unit')}", str(base.get("usd_per_unit") or ""), key=pkey + "usd"
                )
                pslots["usd_per_unit"] = st.empty()
            changes["effective_date"] = st.date_input(
                "Effective from",
                datetime.now(UTC).date(),
                key=pkey + "date",
                help="The price in force is the latest effective date on or before today.",
            )
            pslots["effective_date"] = st.empty()
        with p2:
            changes["source"] = st.text_input(
                "Source (a URL or a sentence)", str(base.get("source") or ""), key=pkey + "source"
            )
            pslots["source"] = st.empty()
            changes["notes"] = st.text_input("Notes", str(base.get("notes") or ""), key=pkey + "notes")
            pslots["notes"] = st.empty()
            price_comment = st.text_input("Comment", key=pkey + "comment", max_chars=2000)
        rule = price_draft(base, changes)
        perrors = check_price_draft(rule)
        for message in field_errors_at(pslots, perrors):
            st.error(message)
        if save_button("Add price version", key=pkey + "save", valid=not perrors):  # core says if it is unchanged
            added = _write(price_store.add_price_version, rule, comment=price_comment or None)
            if added is not None:
                if added.changed:
                    state.flash(f"Added {price_provider} price version {added.current.version}.")
                    st.rerun()
                st.info("That price equals the latest version: nothing was added.")


@st.fragment
def _transfer_panel() -> None:
    """Export as JSON; import with the dry-run diff before anything is applied."""
    with state.db_session() as session:
        st.download_button(
            "Download settings and prices (JSON)",
            data=transfer.export_json(session, actor),
            file_name="imagegate-settings.json",
            mime="application/json",
            help="Every configured provider, the global settings and each provider's latest price. Never keys.",
        )
        st.markdown("**Import**")
        uploaded = st.file_uploader(
            "Settings file",
            type=["json"],
            key="import.file",
            help=f"An export of this or another Imagegate, at most {transfer.MAX_IMPORT_BYTES // 1024} KiB. "
            "Nothing changes before you apply the plan shown below.",
        )
        pasted = st.text_area("…or paste its JSON", key="import.text", height=150)
        raw: bytes | str | None = uploaded.getvalue() if uploaded is not None else (pasted or None)
        if raw:
            try:
                plan = transfer.plan_import(session, actor, raw)
            except InvalidInput as exc:
                st.error(f"Nothing can be imported: {exc}")
                for name, message in exc.field_errors.items():
                    st.caption(f"{name}: {message}")
            else:
                st.markdown("**Dry run: what applying it would change**")
                if not plan.has_changes:
                    st.info("Nothing would change.")
                for item in plan.changed:
                    what = "global settings" if item.kind == "global_settings" else f"{item.kind} {item.target}"
                    st.markdown(f"*{item.action}* {what}" + (f" ({item.note})" if item.note else ""))
                    st.dataframe(changes_table(item.changes, "now", "after import"), hide_index=True, width="stretch")
                import_comment = st.text_input("Comment", key="import.comment", max_chars=2000)
                if st.button("Apply import", type="primary", disabled=not plan.has_changes, key="import.apply"):
                    applied = _write(transfer.apply_import, raw, comment=import_comment or None)
                    if applied is not None:
                        counts = transfer.import_summary(applied)
                        state.flash(f"Imported: {counts['create']} created, {counts['update']} updated.")
                        st.rerun()


with state.db_session() as session:
    overviews = provider_overviews(session)
    health = {h.provider: h for h in health_report(session)}
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "provider": o.spec.label,
                    "id": o.provider,
                    "mode": o.connection.mode.value,
                    "health": health[o.provider].status.value.replace("_", " "),
                    "key": o.key.masked,
                    "priority": o.settings.priority if o.settings else None,
                    "active": o.settings.active if o.settings else False,
                    "default": o.settings.is_default if o.settings else False,
                    "premium": o.spec.premium,
                    "price": o.price_description or "no price",
                    "one image": o.one_image.formatted if o.one_image else "—",
                }
                for o in overviews
            ]
        ),
        hide_index=True,
        width="stretch",
    )

provider_tab, global_tab, prices_tab, transfer_tab = st.tabs(
    ["Provider", "Global settings and presets", "Prices", "Import and export"]
)
with provider_tab:
    _provider_editor()
with global_tab:
    _global_editor()
with prices_tab:
    _prices_editor()
with transfer_tab:
    _transfer_panel()
