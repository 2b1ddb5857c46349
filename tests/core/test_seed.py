"""Seeding defaults: complete on a fresh database, idempotent, respectful of admins' deletions."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core import price_store, settings_service
from core.catalog import provider_ids
from core.pricing import load_default_prices
from core.security import Actor
from core.seed import seed_defaults
from core.settings import default_provider_settings
from db.engine import transaction
from db.models import AuditLog, GlobalSettingsVersion, PriceVersion, ProviderSettingsVersion
from tests.dbfixtures import *  # noqa: F403

ADMIN = Actor.system("ada")


def _counts(factory: sessionmaker[Session]) -> dict[str, int]:
    with factory() as session:
        return {
            model.__tablename__: int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (ProviderSettingsVersion, GlobalSettingsVersion, PriceVersion, AuditLog)
        }


def test_seed_creates_catalog_defaults_global_settings_and_prices(db_session_factory: sessionmaker[Session]) -> None:
    report = seed_defaults(db_session_factory)
    prices = load_default_prices()
    assert sorted(report.provider_settings) == sorted(provider_ids())
    assert report.global_settings and sorted(report.prices) == sorted(prices.prices)
    with db_session_factory() as session:
        for provider in provider_ids():
            view = settings_service.get_provider_settings(session, provider)
            assert view.settings == default_provider_settings(provider) and view.updated_by == "system"
        assert settings_service.get_global_settings(session).version == 1
        table = price_store.active_price_table(session)
    today = datetime.now(UTC).date()
    assert table.prices == {p: price for p, price in prices.prices.items() if price.effective_date <= today}


def test_seed_twice_creates_nothing_new(db_session_factory: sessionmaker[Session]) -> None:
    seed_defaults(db_session_factory)
    counts = _counts(db_session_factory)
    again = seed_defaults(db_session_factory)
    assert not again.created_anything
    assert _counts(db_session_factory) == counts


def test_seed_keeps_admins_changes_and_deletions(db_session_factory: sessionmaker[Session]) -> None:
    seed_defaults(db_session_factory)
    with transaction(db_session_factory) as session:
        settings_service.update_provider_settings(session, ADMIN, "fal-qwen", {"priority": 3})
        settings_service.delete_provider_settings(session, ADMIN, "ideogram")
    counts = _counts(db_session_factory)
    assert not seed_defaults(db_session_factory).created_anything
    assert _counts(db_session_factory) == counts
    with db_session_factory() as session:
        assert settings_service.get_provider_settings(session, "fal-qwen").settings.priority == 3
        assert "ideogram" not in {v.provider for v in settings_service.list_provider_settings(session)}


def test_two_processes_seeding_at_once_create_everything_once(db_session_factory: sessionmaker[Session]) -> None:
    barrier = threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            seed_defaults(db_session_factory)
        except BaseException as error:  # reported below, with the assertion
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    expected_prices = len(load_default_prices().prices)
    counts = _counts(db_session_factory)
    assert counts["provider_settings_versions"] == len(provider_ids())
    assert counts["global_settings_versions"] == 1
    assert counts["price_versions"] == expected_prices
    assert counts["audit_log"] == len(provider_ids()) + 1 + expected_prices
