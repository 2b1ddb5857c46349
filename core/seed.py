"""First-run data: each provider's catalog defaults, the global settings and the built-in prices.

Idempotent: only what is missing is created, so running it at every start (or twice at once, from two
processes) creates nothing new. A provider an admin deleted stays deleted: seed looks for any history, not
for current settings. Presets are code (core.presets), not stored, so there is nothing to seed for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import exc
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Conflict
from core import price_store, settings_service
from core.catalog import provider_ids
from core.pricing import PriceTable, load_default_prices
from core.security import Actor
from core.settings import GlobalSettings, default_provider_settings
from db.engine import transaction

SEED_COMMENT = "catalog defaults (seed)"


@dataclass
class SeedReport:
    provider_settings: list[str] = field(default_factory=list)
    """Providers whose default settings were created."""
    global_settings: bool = False
    prices: list[str] = field(default_factory=list)
    """Providers whose built-in price was stored."""

    @property
    def created_anything(self) -> bool:
        return bool(self.provider_settings or self.global_settings or self.prices)


def _seed(session: Session, prices: PriceTable, report: SeedReport) -> None:
    actor = Actor.system()
    for provider in provider_ids():
        if not settings_service.is_configured(session, provider):
            settings_service.save_provider_settings(
                session, actor, provider, default_provider_settings(provider), comment=SEED_COMMENT
            )
            report.provider_settings.append(provider)
    if settings_service.get_global_settings(session).version == 0:
        settings_service.save_global_settings(session, actor, GlobalSettings(), comment=SEED_COMMENT)
        report.global_settings = True
    for provider, price in prices.prices.items():
        if price_store.latest_price_version(session, provider) is None:
            price_store.add_price_version(session, actor, price, comment=SEED_COMMENT)
            report.prices.append(provider)


def _run(factory: sessionmaker[Session], prices: PriceTable) -> SeedReport:
    report = SeedReport()
    with transaction(factory) as session:
        _seed(session, prices, report)
    return report


def seed_defaults(factory: sessionmaker[Session], prices: PriceTable | None = None) -> SeedReport:
    """Create whatever default data is missing, in one transaction; returns what was created."""
    table = prices or load_default_prices()
    try:
        return _run(factory, table)
    except (exc.IntegrityError, Conflict):
        # Another process seeded at the same moment and won; a second pass finds its rows and adds the rest.
        return _run(factory, table)
