"""One read of everything a person needs to see about each provider: connection, key, settings, effective
parameters with their sources, price, and the cost of one image at these settings.

The console's Settings page and `imagegate debug-config` both show this; neither computes any of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from core import price_store, settings_service
from core.catalog import PROVIDERS, ProviderSpec
from common.errors import InvalidInput
from core.keys import KeyStatus, key_status
from core.pricing import CostEstimate, estimate_cost
from core.providers.registry import ProviderConnection, connection_for
from core.settings import EffectiveParams, ProviderSettings, describe_source, resolve_effective

PREVIEW_PROMPT = "settings preview"


@dataclass(frozen=True)
class ProviderOverview:
    spec: ProviderSpec
    connection: ProviderConnection
    key: KeyStatus
    settings: ProviderSettings | None
    """None when the provider has no settings (never seeded, or deleted)."""
    settings_version: int | None
    effective: EffectiveParams | None
    price_description: str | None
    price_version: int | None
    price_source: str | None
    one_image: CostEstimate | None
    """The cost of one image at these settings (num_images forced to 1)."""
    problems: list[str] = field(default_factory=list)

    @property
    def provider(self) -> str:
        return self.spec.id

    def effective_rows(self) -> list[dict[str, object]]:
        """Parameter, value and where it came from, for a table."""
        if self.effective is None:
            return []
        return [
            {"parameter": name, "value": tagged.value, "from": describe_source(tagged.source)}
            for name, tagged in self.effective.params.items()
        ]


def provider_overviews(session: Session) -> list[ProviderOverview]:
    """Every provider in the catalog, highest configured priority first (unconfigured ones last)."""
    global_settings = settings_service.get_global_settings(session).settings
    configured = {view.provider: view for view in settings_service.list_provider_settings(session)}
    prices = price_store.active_prices(session)
    out: list[ProviderOverview] = []
    for provider_id, spec in PROVIDERS.items():
        view = configured.get(provider_id)
        price_view = prices.get(provider_id)
        problems: list[str] = []
        effective: EffectiveParams | None = None
        estimate: CostEstimate | None = None
        try:
            effective = resolve_effective(
                provider_id,
                global_settings=global_settings,
                provider_settings=view.settings if view else None,
                preset=None,
                overrides=None,
                prompt=PREVIEW_PROMPT,
            )
        except InvalidInput as exc:
            problems.append(f"the stored settings do not validate: {exc}")
        if view is None:
            problems.append("no settings saved: catalog defaults shown; run `imagegate seed`")
        if price_view is None:
            problems.append("no price in force: estimates are impossible (an unpriced provider is never free)")
        elif effective is not None:
            try:
                estimate = estimate_cost(
                    price_view.price, provider_id=provider_id, params={**effective.values(), "num_images": 1}
                )
            except ValueError as exc:
                problems.append(f"cannot price these settings: {exc}")
        out.append(
            ProviderOverview(
                spec=spec,
                connection=connection_for(provider_id),
                key=key_status(spec),
                settings=view.settings if view else None,
                settings_version=view.version if view else None,
                effective=effective,
                price_description=price_view.price.describe() if price_view else None,
                price_version=price_view.version if price_view else None,
                price_source=price_view.price.source if price_view else None,
                one_image=estimate,
                problems=problems,
            )
        )
    out.sort(key=lambda o: (o.settings is None, -(o.settings.priority if o.settings else 0), o.provider))
    return out
