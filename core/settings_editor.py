"""What the Settings screen needs while someone edits: a draft checked field by field as they type, the
effective parameters that draft would run with (each value's source) and the cost of one image, before anything
is saved. Reads only; saving goes through core.settings_service and core.price_store.

The rules stay where they are: validation is core.settings (`validate_settings`); resolution and the cost go
through the one preparation step (core.generation.prepare) on a snapshot with the draft in place of the stored
settings, as the optimizer prices a proposed edit.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from functools import cache
from typing import Any, Literal

from sqlalchemy.orm import Session

from common.errors import InvalidInput, NotFound
from core import settings_service
from core.catalog import COMMON_PARAMS, PROVIDERS, ParamSpec
from core.generation.prepare import prepare
from core.generation.snapshot import SettingsSnapshot, load_snapshot
from core.money import format_usd
from core.overview import PREVIEW_PROMPT
from core.presets import preset_params, presets_for
from core.pricing import CostEstimate, parse_price
from core.settings import (
    EffectiveParams,
    GlobalSettings,
    ProviderSettings,
    describe_source,
    validate_global_settings,
)
from core.spend.optimizer import ChangeCost, change_cost

FieldKind = Literal["int", "float", "bool", "optional_bool", "text", "choice", "many"]


@dataclass(frozen=True)
class DraftCheck:
    """A draft of one provider's settings, checked: the field errors (keyed as core reports them:
    `priority`, `params.image_size`), the settings when valid, what they resolve to and one image's cost."""

    provider: str
    field_errors: Mapping[str, str]
    settings: ProviderSettings | None
    effective: EffectiveParams | None
    one_image: CostEstimate | None
    request_cost: CostEstimate | None = None
    """The cost of a request at these settings (their number of images)."""
    problems: tuple[str, ...] = ()
    changes: tuple[settings_service.FieldChange, ...] = ()
    """What saving the draft would change against the stored current version."""

    @property
    def valid(self) -> bool:
        return not self.field_errors and self.settings is not None

    def rows(self) -> list[dict[str, object]]:
        """Parameter, value and where it came from, for a table (None shows as "random" for the seed)."""
        if self.effective is None:
            return []
        return [
            {
                "parameter": name,
                "value": "random" if t.value is None else str(t.value),
                "from": describe_source(t.source),
            }
            for name, t in self.effective.params.items()
        ]


def _snapshot_with(session: Session, provider: str, settings: ProviderSettings | None) -> SettingsSnapshot:
    """What the database holds now, with `settings` in place of the provider's stored ones (None: without any),
    for core.generation.prepare to resolve and price a draft exactly as a request would be. Nothing is stored."""
    return load_snapshot(session).with_provider_settings(provider, settings, updated_by="this form")


def inherited_values(session: Session, provider: str) -> dict[str, Any]:
    """Each parameter's value without the provider's own settings: the catalog default, or the global settings'."""
    prepared = prepare(
        None, provider, prompt=PREVIEW_PROMPT, preset="none", snapshot=_snapshot_with(session, provider, None)
    )
    if prepared.effective is None:
        raise InvalidInput(
            prepared.error or f"{provider}: the global settings do not resolve", dict(prepared.field_errors or {})
        )
    return prepared.effective.values()


def draft_params(stored: Mapping[str, Any], inherited: Mapping[str, Any], shown: Mapping[str, Any]) -> dict[str, Any]:
    """The `params` a save stores from the values a form shows: a parameter the provider already sets keeps being
    set (to the value shown); any other is set only when the value shown differs from what it inherits, so an
    untouched form changes nothing and a value left alone keeps following the global settings."""
    out: dict[str, Any] = {}
    for name, value in shown.items():
        if name in stored or value != inherited.get(name):
            out[name] = value
    return out


def check_draft(session: Session, provider: str, draft: Mapping[str, Any]) -> DraftCheck:
    """Validate `draft` (a whole ProviderSettings mapping) as a save would, and preview it: effective parameters
    (no preset, no request) and the cost of one image at the price in force. Never raises for bad input."""
    try:
        settings = settings_service.validate_settings(provider, draft)
    except InvalidInput as exc:
        errors = dict(exc.field_errors) or {"settings": str(exc)}
        return DraftCheck(provider, errors, None, None, None)
    snapshot = _snapshot_with(session, provider, settings)
    prepared = prepare(None, provider, prompt=PREVIEW_PROMPT, preset="none", priced_images=1, snapshot=snapshot)
    effective = prepared.effective
    if effective is None:
        errors = {f"params.{k}": v for k, v in (prepared.field_errors or {}).items()}
        return DraftCheck(provider, errors or {"settings": prepared.error or "invalid"}, None, None, None)
    problems = list(prepared.problems)
    one_image = prepared.estimate
    request_cost = None
    if one_image is not None:  # the whole request (its number of images), priced by the same step
        request_cost = prepare(None, provider, prompt=PREVIEW_PROMPT, preset="none", snapshot=snapshot).estimate
    try:
        stored: dict[str, Any] | None = settings_service.settings_json(
            settings_service.get_provider_settings(session, provider).settings
        )
    except (InvalidInput, NotFound):  # none stored yet (or deleted): everything saved is new
        stored = None
    changes = tuple(settings_service.diff_settings(stored, settings_service.settings_json(settings)))
    return DraftCheck(provider, {}, settings, effective, one_image, request_cost, tuple(problems), changes)


def check_global_draft(draft: Mapping[str, Any]) -> tuple[GlobalSettings | None, dict[str, str]]:
    """The global settings a draft makes, or its field errors."""
    try:
        return validate_global_settings(draft), {}
    except InvalidInput as exc:
        return None, dict(exc.field_errors) or {"settings": str(exc)}


def number_from_text(text: str, kind: Literal["int", "float"]) -> Any:
    """A number typed as text: "" is "not set" (None); "30" an int, "2.5" a float. Anything else is returned
    as typed, so the validator names the field and the value ("steps must be a whole number, not '2.5'")."""
    stripped = text.strip()
    if not stripped:
        return None
    try:
        return int(stripped)
    except ValueError:
        pass
    if kind == "float":
        try:
            return float(stripped)
        except ValueError:
            pass
    return stripped


# --- the global settings, described for a form ---------------------------------------------------------------


EDITED_ELSEWHERE = frozenset({"preset_overrides"})
"""Global settings with their own editor (the presets table), left out of the global settings form."""


@dataclass(frozen=True)
class GlobalField:
    name: str
    kind: FieldKind
    group: str
    help: str
    choices: tuple[str, ...] = field(default=())


_GROUPS = {
    "request_timeout_s": "Routing",
    "default_preset": "Routing",
    "fallback_enabled": "Routing",
    "max_attempts": "Routing",
    "routing_policy": "Routing",
    "premium_in_auto_routing": "Routing",
    "fallback_on_safety": "Routing",
    "retries_per_provider": "Retries",
    "retry_backoff_s": "Retries",
    "retry_backoff_max_s": "Retries",
}


@cache
def _attribute_docs() -> dict[str, str]:
    """GlobalSettings' fields are documented by the string under each (not by pydantic descriptions)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(GlobalSettings)))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for field_node, doc_node in itertools.pairwise(body):
        if (
            isinstance(field_node, ast.AnnAssign)
            and isinstance(field_node.target, ast.Name)
            and isinstance(doc_node, ast.Expr)
            and isinstance(doc_node.value, ast.Constant)
            and isinstance(doc_node.value.value, str)
        ):
            docs[field_node.target.id] = " ".join(doc_node.value.value.split())
    return docs


def _help(name: str) -> str:
    info = GlobalSettings.model_fields[name]
    return (info.description or _attribute_docs().get(name, "")).strip()


def global_fields() -> list[GlobalField]:
    """Every global setting with the widget kind that edits it and its group, in the model's order."""
    from core.presets import PRESET_NAMES  # local: keeps this module's imports to what most callers use

    out: list[GlobalField] = []
    for name, info in GlobalSettings.model_fields.items():
        if name in EDITED_ELSEWHERE:
            continue
        default = info.default
        if name in COMMON_PARAMS:
            spec = _common_spec(name)
            kind: FieldKind = {"int": "int", "float": "float", "bool": "optional_bool"}.get(spec.kind, "text")  # type: ignore[assignment]
            out.append(GlobalField(name, kind, "Generation defaults (every provider)", spec.description))
        elif name == "routing_policy":
            out.append(
                GlobalField(name, "choice", "Routing", _help(name), ("priority", "cheapest", "fastest", "explicit"))
            )
        elif name == "default_preset":
            out.append(GlobalField(name, "choice", "Routing", _help(name), ("none", *PRESET_NAMES)))
        else:
            group = _GROUPS.get(
                name, "Circuit breakers and health" if name.startswith(("breaker", "health")) else "Other"
            )
            if isinstance(default, bool):
                out.append(GlobalField(name, "bool", group, _help(name)))
            elif isinstance(default, tuple):  # a choice of several (the full set is the default)
                out.append(GlobalField(name, "many", group, _help(name), tuple(str(v) for v in default)))
            elif isinstance(default, int):
                out.append(GlobalField(name, "int", group, _help(name)))
            elif isinstance(default, float):
                out.append(GlobalField(name, "float", group, _help(name)))
            else:  # amounts (Decimal) and text: typed as text, validated exactly by core
                out.append(GlobalField(name, "text", group, _help(name)))
    return out


def _common_spec(name: str) -> ParamSpec:
    for spec in PROVIDERS.values():
        if name in spec.params:
            return spec.params[name]
    raise KeyError(name)  # pragma: no cover - COMMON_PARAMS are all in the catalog


# --- prices -----------------------------------------------------------------------------------------------------


def price_draft(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A new price version's rule: the latest version's rule with the form's changes (empty texts left out)."""
    rule = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping):
            rule[key] = {**dict(rule.get(key) or {}), **dict(value)}
        elif value is not None:
            rule[key] = value.isoformat() if isinstance(value, date) else value
    return rule


def check_price_draft(rule: Mapping[str, Any]) -> dict[str, str]:
    """Field errors of a price rule (empty when it parses), as core.pricing reports them."""
    try:
        parse_price(dict(rule))
    except InvalidInput as exc:
        return dict(exc.field_errors) or {"price": str(exc)}
    return {}


# --- quality presets -------------------------------------------------------------------------------------------


def preset_param_names(provider: str) -> list[str]:
    """The parameters the presets editor shows for a provider: those any built-in preset sets there, in the
    catalog's order (an edit changes a value a preset already trades; it adds no new kind of value)."""
    named = {n for values in presets_for(provider).values() for n in values}
    return [n for n in PROVIDERS[provider].params if n in named]


def preset_overrides_draft(
    current: Mapping[str, Mapping[str, Mapping[str, Any]]], provider: str, shown: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """The `preset_overrides` a save stores from the values a presets form shows for one provider (preset ->
    {param: value}): the other providers' edits are kept; for this one, a value is an edit only when it differs
    from the built-in value, so an untouched form (or one set back to the built-in values) stores nothing."""
    out: dict[str, dict[str, dict[str, Any]]] = {
        preset: {pid: dict(values) for pid, values in by_provider.items() if pid != provider}
        for preset, by_provider in current.items()
    }
    for preset, values in shown.items():
        builtin = preset_params(preset, provider)
        edited = {n: v for n, v in values.items() if n not in builtin or v != builtin[n]}
        if edited:
            out.setdefault(preset, {})[provider] = edited
    return {preset: by_provider for preset, by_provider in out.items() if by_provider}


def global_draft_with(settings: GlobalSettings, **changes: Any) -> dict[str, Any]:
    """The stored form of `settings` with some fields replaced: a draft for save_global_settings."""
    return {**settings_service.settings_json(settings), **changes}


@dataclass(frozen=True)
class CostChange:
    """What a provider-settings draft would do to monthly spend at the last 30 days' volume (the optimizer's
    `change_cost`), as the Settings preview shows it."""

    headline: str
    """"+$1.20/month", "-$0.40/month", "no change", or why it cannot be judged."""
    detail: str
    judged: bool
    """False when there is no history to judge from (or the draft cannot be priced)."""
    change: ChangeCost | None = None


def change_cost_preview(
    session: Session, provider: str, draft: Mapping[str, Any], *, spend_mode: str = "live"
) -> CostChange:
    """The optimizer's "what this change costs per month" for a draft, before saving, at the last 30 days'
    `spend_mode` volume ("live", or "simulated" for a provider in sandbox or emulator mode, whose images were
    never billed). Never raises for bad input: an invalid or unpriceable draft says so instead."""
    volume = "" if spend_mode == "live" else " simulated"
    try:
        change = change_cost(session, provider, draft, spend_mode=spend_mode)
    except InvalidInput as exc:
        return CostChange("—", f"cannot estimate: {exc}", judged=False)
    if change.images_last_30_days == 0:
        return CostChange(
            "no history",
            f"{provider} made no{volume} images in the last 30 days, so there is no volume to judge this change by. "
            f"One image: {format_usd(change.per_image_before_micro_usd)} now, "
            f"{format_usd(change.per_image_after_micro_usd)} with this change.",
            judged=False,
            change=change,
        )
    delta = change.monthly_change_micro_usd
    headline = "no change" if delta == 0 else f"{'+' if delta > 0 else '-'}{format_usd(abs(delta))}/month"
    detail = (
        f"At the last 30 days'{volume} volume ({change.images_last_30_days} image(s)): "
        f"{format_usd(change.monthly_before_micro_usd)} now, {format_usd(change.monthly_after_micro_usd)} with "
        f"this change ({format_usd(change.per_image_before_micro_usd)} -> "
        f"{format_usd(change.per_image_after_micro_usd)} per image)."
    )
    return CostChange(headline, detail, judged=True, change=change)
