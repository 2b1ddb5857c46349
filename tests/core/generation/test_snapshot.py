"""The settings and price cache, on SQLite and PostgreSQL: one query when warm, reloaded on every change.

Query counts are measured with a SQLAlchemy event counter on the engine (every statement sent to the database).
Times are not asserted here (bench/snapshot_read.py measures them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, event, update
from sqlalchemy.orm import Session, sessionmaker

from core import price_store, settings_service
from core.generation.prepare import prepare
from core.generation.snapshot import SettingsCache, SettingsSnapshot, version_vector
from core.pricing import load_default_prices
from core.security import Actor
from core.seed import seed_defaults
from db.engine import make_engine, session_factory, transaction
from db.models import ProviderSettingsCurrent, ProviderSettingsVersion

Factory = sessionmaker[Session]
SYSTEM = Actor.system("test")
OLD_READ_PATH_QUERIES = 8
"""What the read path cost before the cache: global settings, every provider's pointer and version, prices."""


@pytest.fixture
def seeded(db_session_factory: Factory) -> Factory:
    seed_defaults(db_session_factory)
    return db_session_factory


@pytest.fixture
def other_process(db_url: str) -> Iterator[Factory]:
    """Another engine on the same database: a change made there is what another process's save looks like."""
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


class Counter:
    def __init__(self, engine: Engine) -> None:
        self.statements: list[str] = []
        event.listen(engine, "before_cursor_execute", self._count)
        self._engine = engine

    def _count(self, _conn: object, _cursor: object, statement: str, *_args: object) -> None:
        self.statements.append(statement)

    def measure(self, fn: Callable[[], Any]) -> int:
        self.statements.clear()
        fn()
        return len(self.statements)

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._count)


@pytest.fixture
def counter(db_engine: Engine) -> Iterator[Counter]:
    counting = Counter(db_engine)
    yield counting
    counting.close()


def _save_priority(factory: Factory, provider: str, priority: int) -> bool:
    with transaction(factory) as session:
        return settings_service.update_provider_settings(session, SYSTEM, provider, {"priority": priority}).changed


def _add_price(factory: Factory, provider: str, per_mp: str, effective: date | None = None) -> int:
    price = load_default_prices().prices[provider]
    data = price_store.price_json(price)
    data["usd_per_unit"] = per_mp
    if effective is not None:
        data["effective_date"] = effective.isoformat()
    with transaction(factory) as session:
        return price_store.add_price_version(session, SYSTEM, data).current.id


# --- cost ---------------------------------------------------------------------------------------------------------


def test_a_warm_read_is_one_query_a_cold_one_five(seeded: Factory, counter: Counter) -> None:
    def old_path() -> None:
        with seeded() as session:
            settings_service.get_global_settings(session)
            settings_service.settings_for_routing(session)
            price_store.active_prices(session)

    old = counter.measure(old_path)
    cache = SettingsCache(seeded)
    cold = counter.measure(cache.get)
    warm = [counter.measure(cache.get) for _ in range(5)]
    print(f"queries: old read path {old}, snapshot cold {cold}, warm {warm[0]}")
    assert old == OLD_READ_PATH_QUERIES
    assert cold == 5  # vector, global settings, providers, prices, vector again
    assert warm == [1] * 5
    assert cache.loads == 1
    # Preparing a request from the snapshot reads nothing more.
    snap = cache.get()
    assert counter.measure(lambda: prepare(None, "fal-qwen", prompt="a fox", snapshot=snap)) == 0


def test_recheck_after_skips_even_the_vector_for_a_while(seeded: Factory, counter: Counter) -> None:
    now = [1000.0]
    cache = SettingsCache(seeded, recheck_after_s=2.0, clock=lambda: now[0])
    cache.get()
    assert counter.measure(cache.get) == 0
    _save_priority(seeded, "fal-qwen", 11)
    assert cache.get().stored_settings("fal-qwen").settings.priority != 11  # type: ignore[union-attr]
    now[0] += 2.5
    assert cache.get().stored_settings("fal-qwen").settings.priority == 11  # type: ignore[union-attr]


# --- content ------------------------------------------------------------------------------------------------------


def test_the_snapshot_holds_what_the_services_read(seeded: Factory) -> None:
    snap = SettingsCache(seeded).get()
    with seeded() as session:
        assert snap.global_settings == settings_service.get_global_settings(session)
        assert snap.routing_settings() == settings_service.settings_for_routing(session)
        for provider in snap.routing_settings():
            assert snap.stored_settings(provider) == settings_service.get_provider_settings(session, provider)
            assert snap.price(provider) == price_store.active_price(session, provider)
        assert snap.price_table().prices == price_store.active_price_table(session).prices
    assert snap.problems == ()


def test_prepare_from_a_snapshot_equals_prepare_from_the_database(seeded: Factory) -> None:
    snap = SettingsCache(seeded).get()
    request = {"prompt": "a red fox", "preset": "fast", "overrides": {"num_images": 2, "seed": 5}}
    for provider in ("fal-qwen", "ideogram", "huggingface", "qwen", "sandbox"):
        with seeded() as session:
            direct = prepare(session, provider, **request)  # type: ignore[arg-type]
        cached = prepare(None, provider, snapshot=snap, **request)  # type: ignore[arg-type]
        assert cached == direct
    with pytest.raises(ValueError):
        prepare(None, "fal-qwen", prompt="x")


def test_with_provider_settings_is_a_copy_that_prepare_resolves_from(seeded: Factory) -> None:
    snap = SettingsCache(seeded).get()
    stored = snap.stored_settings("fal-qwen")
    assert stored is not None and stored.settings.params.get("num_inference_steps") != 7
    draft = stored.settings.model_copy(update={"params": {**stored.settings.params, "num_inference_steps": 7}})

    drafted = snap.with_provider_settings("fal-qwen", draft, updated_by="this form")
    view = drafted.stored_settings("fal-qwen")
    assert view is not None and view.settings == draft
    assert (view.version, view.updated_by) == (stored.version, "this form")
    effective = prepare(None, "fal-qwen", prompt="x", snapshot=drafted).effective
    assert effective is not None and effective.values()["num_inference_steps"] == 7
    assert snap.stored_settings("fal-qwen") == stored  # the original is untouched (snapshots are shared)
    assert drafted.stored_settings("ideogram") == snap.stored_settings("ideogram")
    assert (drafted.vector, drafted.prices, drafted.global_settings) == (snap.vector, snap.prices, snap.global_settings)

    without = snap.with_provider_settings("fal-qwen", None, updated_by="this form")
    assert without.stored_settings("fal-qwen") is None
    assert prepare(None, "fal-qwen", prompt="x", snapshot=without).settings is None  # catalog defaults


# --- invalidation -------------------------------------------------------------------------------------------------


def test_a_settings_save_in_another_process_is_seen_on_the_next_read(seeded: Factory, other_process: Factory) -> None:
    cache = SettingsCache(seeded)
    assert cache.get().stored_settings("fal-qwen").settings.priority != 77  # type: ignore[union-attr]
    assert _save_priority(other_process, "fal-qwen", 77)
    snap = cache.get()
    assert snap.stored_settings("fal-qwen").settings.priority == 77  # type: ignore[union-attr]
    assert snap.routing_settings()["fal-qwen"].priority == 77
    assert cache.loads == 2
    assert not _save_priority(other_process, "fal-qwen", 77)  # no change, no new version ...
    cache.get()
    assert cache.loads == 2  # ... so no reload


def test_a_global_settings_save_reloads(seeded: Factory, other_process: Factory) -> None:
    cache = SettingsCache(seeded)
    before = cache.get().global_settings
    with transaction(other_process) as session:
        changed = before.settings.model_copy(update={"max_attempts": 5})
        settings_service.save_global_settings(session, SYSTEM, changed)
    after = cache.get().global_settings
    assert after.version == before.version + 1 and after.settings.max_attempts == 5


def test_a_new_price_reloads_and_a_future_one_takes_over_on_its_day(seeded: Factory, other_process: Factory) -> None:
    today = datetime.now(UTC).date()
    day = [today]
    cache = SettingsCache(seeded, today=lambda: day[0])
    old_id = cache.get().price("fal-qwen").id  # type: ignore[union-attr]
    new_id = _add_price(other_process, "fal-qwen", "0.03")
    snap = cache.get()
    assert snap.price("fal-qwen").id == new_id != old_id  # type: ignore[union-attr]
    assert snap.price("fal-qwen").price.usd_per_unit == Decimal("0.03")  # type: ignore[union-attr]

    next_week = today + timedelta(days=7)
    future_id = _add_price(other_process, "fal-qwen", "0.04", effective=next_week)
    assert cache.get().price("fal-qwen").id == new_id  # type: ignore[union-attr]  # entered, not in force yet
    loads = cache.loads
    day[0] = next_week
    snap = cache.get()
    assert cache.loads == loads + 1  # the date is part of the version vector
    assert snap.price("fal-qwen").id == future_id and snap.day == next_week  # type: ignore[union-attr]


def test_deleted_and_invalid_provider_settings(seeded: Factory, other_process: Factory) -> None:
    cache = SettingsCache(seeded)
    with transaction(other_process) as session:
        settings_service.delete_provider_settings(session, SYSTEM, "huggingface")
    snap = cache.get()
    assert "huggingface" in snap.deleted and snap.stored_settings("huggingface") is None
    assert "huggingface" not in snap.routing_settings()

    # Stored settings the catalog no longer accepts (as after an upgrade): written as a new version by hand.
    with transaction(other_process) as session:
        pointer = session.get(ProviderSettingsCurrent, "qwen")
        assert pointer is not None
        row = ProviderSettingsVersion(
            provider="qwen",
            version=pointer.version + 1,
            settings={"provider": "qwen", "params": {"num_inference_steps": 10_000}},
            created_by_name="test",
        )
        session.add(row)
        session.flush()
        session.execute(
            update(ProviderSettingsCurrent)
            .where(ProviderSettingsCurrent.provider == "qwen")
            .values(current_version_id=row.id, version=row.version)
        )
    snap = cache.get()
    assert snap.stored_settings("qwen") is None and "qwen" not in snap.routing_settings()
    assert "qwen" in snap.invalid and snap.problems[0].startswith("qwen: stored settings version")
    assert "fal-qwen" in snap.routing_settings()  # one provider's bad row breaks nothing else
    prepared = prepare(None, "qwen", prompt="x", snapshot=snap)
    assert prepared.settings is None and prepared.valid  # catalog defaults, as prepare() did before


# --- concurrency --------------------------------------------------------------------------------------------------


def test_threads_share_one_reload(seeded: Factory, other_process: Factory) -> None:
    cache = SettingsCache(seeded)
    cache.get()
    _save_priority(other_process, "sandbox", 5)
    barrier = threading.Barrier(8)
    results: list[SettingsSnapshot] = []

    def read() -> None:
        barrier.wait(30)
        results.append(cache.get())

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 8
    assert cache.loads == 2  # one reload for all eight
    assert all(r is results[0] for r in results)
    assert results[0].stored_settings("sandbox").settings.priority == 5  # type: ignore[union-attr]


def test_a_change_landing_during_a_reload_is_not_lost(
    seeded: Factory, other_process: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A price saved after the reload read the prices but before it read the vector again: the snapshot must
    not be tagged with a vector that already counts a price it does not hold."""
    cache = SettingsCache(seeded)
    cache.get()
    real_active_prices = price_store.active_prices
    landed: list[int] = []

    def prices_then_a_save(session: Session, on: date | None = None) -> Any:
        result = real_active_prices(session, on)
        if not landed:
            landed.append(_add_price(other_process, "huggingface", "0.05"))
        return result

    monkeypatch.setattr(price_store, "active_prices", prices_then_a_save)
    _save_priority(other_process, "sandbox", 6)  # something to reload for
    cache.get()
    monkeypatch.setattr(price_store, "active_prices", real_active_prices)
    assert cache.get().price("huggingface").id == landed[0]  # type: ignore[union-attr]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite hands out ids in commit order
def test_a_price_committed_late_with_a_lower_id_is_seen(db_url: str, seeded: Factory, other_process: Factory) -> None:
    """PostgreSQL hands out ids before commit: a price with id N can commit after one with id N+1. A vector of
    max(id) alone would miss it forever; the row count does not."""
    cache = SettingsCache(seeded)
    cache.get()
    price = price_store.price_json(load_default_prices().prices["huggingface"])
    price["usd_per_unit"] = "0.07"
    slow = other_process()
    try:
        slow_id = price_store.add_price_version(slow, SYSTEM, price).current.id  # id taken, not committed
        fast_id = _add_price(other_process, "fal-qwen", "0.05")
        assert fast_id > slow_id
        assert cache.get().price("fal-qwen").id == fast_id  # type: ignore[union-attr]
        slow.commit()
    finally:
        slow.close()
    assert cache.get().price("huggingface").id == slow_id  # type: ignore[union-attr]


async def test_aget_reads_on_the_database_executor(seeded: Factory) -> None:
    cache = SettingsCache(seeded)
    snap = await cache.aget()
    with seeded() as session:
        assert snap.vector == version_vector(session, snap.day)
