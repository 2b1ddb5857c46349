"""One preparation step for a request to one provider: load its settings and price, resolve, translate, estimate.

The Settings page and `imagegate debug-config` (core.overview), `imagegate test-provider` and the generation
service all prepare requests here and nowhere else, so what a screen shows is what a run sends and costs.

Nothing here raises for a request that cannot run: the result says why (field errors, problems), so an overview
can show every provider and fallback can skip a candidate that refuses. `PreparedRequest.refusal()` turns the
field errors into the `InvalidInput` a caller that must stop can raise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from common.errors import InvalidInput, NotFound
from core import price_store, settings_service
from core.price_store import PriceVersionView
from core.pricing import CostEstimate, estimate_cost
from core.providers.base import AdapterRequest, ProviderAdapter, Translation
from core.settings import EffectiveParams, UserPreferenceValues, resolve_effective
from core.settings_service import ProviderSettingsView

if TYPE_CHECKING:
    from core.generation.snapshot import SettingsSnapshot

NO_SETTINGS = "no settings saved: catalog defaults shown; run `imagegate seed`"
NO_PRICE = "no price in force: estimates are impossible (an unpriced provider is never free)"


@dataclass(frozen=True)
class PreparedRequest:
    """One request made ready for one provider, or the reasons it cannot be."""

    provider: str
    settings: ProviderSettingsView | None
    """The stored settings used; None when the provider has none (never seeded, or deleted): catalog defaults."""
    global_settings_version: int
    """0 = the global settings were never saved (built-in defaults)."""
    effective: EffectiveParams | None
    """The resolved parameters with their sources; None when they do not validate (see `errors`)."""
    request: AdapterRequest | None
    """What an adapter runs: prompt, canonical values and the attempt's deadline."""
    translation: Translation | None
    """The adapter's wire form; None when no adapter was given or it refused the request."""
    price: PriceVersionView | None
    """The price version in force (its `id` is what usage rows record); None when the provider has none."""
    estimate: CostEstimate | None
    """The cost of this request (or of `priced_images` images); None without a usable price."""
    error: str | None = None
    """A one-line summary when the request does not resolve or the adapter refuses it."""
    field_errors: Mapping[str, str] | None = None
    """Per field (a parameter name, `prompt`, `preset` or `provider`): what is wrong."""
    problems: tuple[str, ...] = ()
    """Everything a person should know, in words: invalid settings, no settings, no price, unpriceable."""

    @property
    def price_version_id(self) -> int | None:
        return None if self.price is None else self.price.id

    @property
    def valid(self) -> bool:
        """The request resolved and (when an adapter was given) translated."""
        return self.error is None and self.request is not None

    @property
    def runnable(self) -> bool:
        """Valid and priced: the generation service runs nothing it cannot price (unpriced is never free)."""
        return self.valid and self.estimate is not None

    def refusal(self) -> InvalidInput | None:
        """The request's field errors as the error a caller raises; None when it is valid."""
        if self.valid:
            return None
        message = self.error or f"the request for {self.provider} cannot be prepared"
        return InvalidInput(message, dict(self.field_errors or {}))


def _stored_settings(session: Session, provider: str) -> ProviderSettingsView | None:
    try:
        return settings_service.get_provider_settings(session, provider)
    except (NotFound, InvalidInput):  # none stored, or an unknown provider: the resolver names the latter
        return None


def prepare(
    session: Session | None,
    provider: str,
    *,
    prompt: str,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    negative_prompt: str | None = None,
    adapter: ProviderAdapter | None = None,
    timeout_s: float | None = None,
    priced_images: int | None = None,
    units_used_this_month: Decimal | int = 0,
    snapshot: SettingsSnapshot | None = None,
    user_preferences: UserPreferenceValues | None = None,
) -> PreparedRequest:
    """Prepare one request for `provider` from what the database holds now.

    Loads the global and the provider's settings and the price in force, resolves the effective parameters
    (catalog -> global -> provider -> `preset` -> `overrides`, `negative_prompt` being one of the overrides),
    has `adapter` (the one that would run it, sandbox or emulator included) translate it when one is given, and
    estimates the cost. `timeout_s` replaces the settings' attempt deadline; `priced_images` prices that many
    images instead of the request's `num_images` (the overview shows the cost of one image);
    `units_used_this_month` places the request on the price's volume tiers (core.spend.tiers: live units
    this UTC month); `user_preferences` are the requesting user's own defaults (core.preferences), placed between
    the provider's settings and the preset. With a `snapshot`
    (core.generation.snapshot) the settings and the price come from it and `session` may be None."""
    if snapshot is not None:
        global_view = snapshot.global_settings
        stored = snapshot.stored_settings(provider)
        price = snapshot.price(provider)
    elif session is None:
        raise ValueError("prepare needs a session or a settings snapshot")
    else:
        global_view = settings_service.get_global_settings(session)
        stored = _stored_settings(session, provider)
        price = price_store.active_price(session, provider)
    requested = dict(overrides or {})
    if negative_prompt is not None:
        requested["negative_prompt"] = negative_prompt

    problems: list[str] = []
    common: dict[str, Any] = {
        "provider": provider,
        "settings": stored,
        "global_settings_version": global_view.version,
        "price": price,
    }
    try:
        effective = resolve_effective(
            provider,
            global_settings=global_view.settings,
            provider_settings=stored.settings if stored else None,
            preset=preset,
            overrides=requested,
            prompt=prompt,
            user_preferences=user_preferences,
        )
    except InvalidInput as exc:
        problems.append(f"the settings or the request do not validate: {exc}")
        problems.extend(_settings_and_price_problems(stored, price))
        return PreparedRequest(
            **common,
            effective=None,
            request=None,
            translation=None,
            estimate=None,
            error=str(exc),
            field_errors=dict(exc.field_errors),
            problems=tuple(problems),
        )
    problems.extend(_settings_and_price_problems(stored, price))

    request = AdapterRequest(
        prompt=effective.prompt,
        params=effective.values(),
        timeout_s=timeout_s if timeout_s is not None else effective.request_timeout_s,
    )
    translation: Translation | None = None
    error: str | None = None
    field_errors: dict[str, str] | None = None
    if adapter is not None:
        try:
            translation = adapter.translate(request)
        except InvalidInput as exc:
            error, field_errors = str(exc), dict(exc.field_errors)
            problems.append(f"the provider cannot take this request: {exc}")

    estimate: CostEstimate | None = None
    if price is not None:
        params = request.params if priced_images is None else {**request.params, "num_images": priced_images}
        try:
            estimate = estimate_cost(
                price.price, provider_id=provider, params=params, units_used_this_month=units_used_this_month
            )
        except ValueError as exc:
            problems.append(f"cannot price these settings: {exc}")

    return PreparedRequest(
        **common,
        effective=effective,
        request=None if error else request,
        translation=translation,
        estimate=estimate,
        error=error,
        field_errors=field_errors,
        problems=tuple(problems),
    )


def _settings_and_price_problems(stored: ProviderSettingsView | None, price: PriceVersionView | None) -> list[str]:
    out: list[str] = []
    if stored is None:
        out.append(NO_SETTINGS)
    if price is None:
        out.append(NO_PRICE)
    return out
