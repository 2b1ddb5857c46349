"""One read of everything a person needs to see about each provider: connection, key, settings, effective
parameters with their sources, price, and the cost of one image at these settings.

The console's Settings page and `imagegate debug-config` both show this; neither computes any of it, and this
module only arranges what the one preparation step (core.generation.prepare) works out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from core.catalog import PROVIDERS, ProviderSpec
from core.generation.prepare import prepare
from core.keys import KeyStatus, key_status
from core.pricing import CostEstimate
from core.providers.registry import ProviderConnection, connection_for
from core.settings import EffectiveParams, ProviderSettings, describe_source

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
    out: list[ProviderOverview] = []
    for provider_id, spec in PROVIDERS.items():
        # The one preparation step (core.generation.prepare), priced for one image.
        prepared = prepare(session, provider_id, prompt=PREVIEW_PROMPT, priced_images=1)
        price_view = prepared.price
        out.append(
            ProviderOverview(
                spec=spec,
                connection=connection_for(provider_id),
                key=key_status(spec),
                settings=prepared.settings.settings if prepared.settings else None,
                settings_version=prepared.settings.version if prepared.settings else None,
                effective=prepared.effective,
                price_description=price_view.price.describe() if price_view else None,
                price_version=price_view.version if price_view else None,
                price_source=price_view.price.source if price_view else None,
                one_image=prepared.estimate,
                problems=list(prepared.problems),
            )
        )
    out.sort(key=lambda o: (o.settings is None, -(o.settings.priority if o.settings else 0), o.provider))
    return out
