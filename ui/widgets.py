"""Widgets the console's pages share: a parameter's input drawn from its catalog entry, a field's error shown
under the field, a diff as a table. Widgets only: what is valid is decided by core."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from core.catalog import ParamSpec
from core.settings_editor import number_from_text
from core.settings_service import FieldChange
from core.transfer import show_value


def field_errors_at(slots: Mapping[str, DeltaGenerator], errors: Mapping[str, str]) -> list[str]:
    """Write each error into the slot under its field (`st.empty()` placed right after the widget); return the
    errors no field on screen took, for a summary."""
    left = []
    for name, message in errors.items():
        slot = slots.get(name)
        if slot is None:
            left.append(f"{name}: {message}")
        else:
            slot.error(message, icon=":material/error:")
    return left


def param_input(spec: ParamSpec, value: Any, key: str, *, help_suffix: str = "") -> Any:
    """One generation parameter's input, chosen by its catalog entry: a slider inside the provider's range for
    steps and guidance, a choice for enums, a toggle for flags, text for sizes and free text, and a number
    typed as text for the rest (empty = inherit, or random for the seed; core checks what is typed)."""
    label = spec.label
    help_text = spec.description + (f" {help_suffix}" if help_suffix else "")
    if (
        spec.kind in ("int", "float")
        and spec.step is not None
        and spec.minimum is not None
        and spec.maximum is not None
        and spec.minimum < spec.maximum
    ):
        if spec.kind == "int":
            current = (
                min(max(int(value), int(spec.minimum)), int(spec.maximum))
                if isinstance(value, int | float)
                else int(spec.minimum)
            )
            return st.slider(
                label, int(spec.minimum), int(spec.maximum), current, int(spec.step), key=key, help=help_text
            )
        current_f = (
            min(max(float(value), spec.minimum), spec.maximum) if isinstance(value, int | float) else spec.minimum
        )
        return st.slider(
            label,
            float(spec.minimum),
            float(spec.maximum),
            current_f,
            float(spec.step),
            key=key,
            help=help_text,
            format="%.1f",
        )
    if spec.kind == "enum":
        choices = list(spec.choices)
        index = choices.index(value) if value in choices else 0
        return st.selectbox(label, choices, index=index, key=key, help=help_text)
    if spec.kind == "bool":
        return st.toggle(label, value=bool(value), key=key, help=help_text)
    if spec.kind in ("int", "float"):
        text = st.text_input(label, "" if value is None else str(value), key=key, help=help_text)
        return number_from_text(text, spec.kind)
    if spec.name == "negative_prompt":
        return st.text_area(label, value or "", key=key, help=help_text, height=80)
    return st.text_input(label, "" if value is None else str(value), key=key, help=help_text)


def changes_table(changes: Iterable[FieldChange], before: str = "before", after: str = "after") -> pd.DataFrame:
    """Field, old value and new value side by side (values as JSON text, so "5" and 5 differ)."""
    return pd.DataFrame(
        [{"field": c.field, before: show_value(c.before), after: show_value(c.after)} for c in changes],
        columns=["field", before, after],
    )


NOT_SAVED_PROBLEMS = "Not saved: fix the problems shown above first."
NOT_SAVED_UNCHANGED = "Nothing to save: this form matches the saved version."


def save_button(
    label: str, *, key: str, valid: bool, changed: bool = True, where: DeltaGenerator | None = None
) -> bool:
    """A save button that never swallows a click: always enabled, because a field typed into and not yet applied
    is applied by the click on the button itself, so a button disabled until then would ignore that click. True
    when the click should save; a click on an invalid or unchanged form says why instead."""
    clicked = (where or st).button(label, type="primary", key=key)
    if clicked and not valid:
        st.error(NOT_SAVED_PROBLEMS)
    elif clicked and not changed:
        st.info(NOT_SAVED_UNCHANGED)
    return clicked and valid and changed
