"""Settings and prices cached in the process, refreshed when their version changes.

Reading them from the database for every request took 8 queries (one per provider) and ~1.75 ms. Here one
cheap query, the *version vector*, tells whether the cached `SettingsSnapshot` still holds (run on a bare
connection: half the cost of a Session on SQLite); only when it does not is the snapshot reloaded: 3 data
queries and the vector again, 5 statements in all.

Public API:
- `SettingsCache(factory, *, today=..., recheck_after_s=0.0)`: one per process (or per engine).
  `cache.get() -> SettingsSnapshot` (blocking: call it on the database executor, or use
  `await cache.aget()`, which does), `cache.invalidate()`, `cache.loads` (how many reloads happened).
- `SettingsSnapshot`: `global_settings` (GlobalSettingsView), `stored_settings(provider)` (what
  core.generation.prepare used to load: None when none is stored, deleted or invalid), `routing_settings()`
  (like settings_service.settings_for_routing: stored or catalog defaults, deleted ones left out; invalid
  stored settings are left out too and named in `problems` instead of failing every request), `price(provider)`
  (PriceVersionView in force on `day`, with the version id usage rows record), `price_table()`, `vector`,
  `with_provider_settings(provider, settings, updated_by=...)` (a copy with a draft in place: previews).
- `version_vector(session, day) -> VersionVector` and `load_snapshot(session, day) -> SettingsSnapshot`.
- `core.generation.prepare.prepare(..., snapshot=...)` prepares from a snapshot without touching the database.

The version vector is ONE statement of five aggregates, each of which moves forward with every committed
change and never back (versions are immutable rows; nothing deletes them):
- the latest global settings version (max of a unique, gap-free version number);
- the sum and the count of the providers' current version numbers (`provider_settings.version` goes up by one
  with every save, rollback and delete of that provider; a new provider adds a row). Not the max id of the
  version rows: on PostgreSQL ids are handed out before commit, so a transaction that took id 10 can commit
  after one that took id 11, and "max id = 11" would hide it forever;
- the count and the max id of price versions (the count catches the late commit the id can hide);
- plus today's date (UTC), computed here: a price whose effective date arrives takes over at midnight.

Consistency: the reload reads the vector, the data (3 queries), then the vector again; the counters only move
forward, so two equal vectors prove nothing committed in between and the data is that one state (a seqlock, on
both databases, without isolation-level tricks). If changes keep landing, the data is tagged with the first
vector, which is always safe: the next call sees a newer vector and reloads.

Threads: a warm `get()` is lock-free (one query, then a comparison); reloads are serialised by a lock and a
thread that waited for it reuses the snapshot another thread just loaded. Snapshots are immutable (frozen
dataclasses and frozen pydantic models, read-only mappings), so any thread may use one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from functools import cached_property
from types import MappingProxyType

from pydantic import ValidationError
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from core import price_store, settings_service
from core.catalog import PROVIDERS
from core.generation.dbexec import run_db
from core.price_store import PriceVersionView
from core.pricing import PriceTable
from core.settings import ProviderSettings, default_provider_settings
from core.settings_service import GlobalSettingsView, ProviderSettingsView
from db.models import GlobalSettingsVersion, PriceVersion, ProviderSettingsCurrent, ProviderSettingsVersion

RELOAD_TRIES = 3
"""Reload attempts while settings keep changing under the reader; the last one is kept, tagged safely."""


@dataclass(frozen=True)
class VersionVector:
    """Everything a snapshot depends on, in a few integers and a date: equal vectors, equal data."""

    global_version: int
    provider_version_sum: int
    provider_count: int
    price_count: int
    price_max_id: int
    day: date


def _utc_today() -> date:
    return datetime.now(UTC).date()


def _vector_statement() -> object:
    return select(
        select(func.coalesce(func.max(GlobalSettingsVersion.version), 0)).scalar_subquery(),
        select(func.coalesce(func.sum(ProviderSettingsCurrent.version), 0)).scalar_subquery(),
        select(func.count()).select_from(ProviderSettingsCurrent).scalar_subquery(),
        select(func.count()).select_from(PriceVersion).scalar_subquery(),
        select(func.coalesce(func.max(PriceVersion.id), 0)).scalar_subquery(),
    )


_VECTOR = _vector_statement()


def version_vector(session: Session | Connection, day: date | None = None) -> VersionVector:
    """The current version vector: one statement."""
    row = session.execute(_VECTOR).one()  # type: ignore[call-overload]
    return VersionVector(
        global_version=int(row[0]),
        provider_version_sum=int(row[1]),
        provider_count=int(row[2]),
        price_count=int(row[3]),
        price_max_id=int(row[4]),
        day=day or _utc_today(),
    )


@dataclass(frozen=True)
class SettingsSnapshot:
    """The global settings, every provider's settings and the prices in force, as of one version vector."""

    vector: VersionVector
    global_settings: GlobalSettingsView
    stored: Mapping[str, ProviderSettingsView]
    """Providers with stored, valid, not deleted settings."""
    deleted: frozenset[str]
    invalid: Mapping[str, str]
    """Providers whose stored settings no longer validate, with the reason."""
    prices: Mapping[str, PriceVersionView]
    """The price in force on `vector.day` per priced provider."""
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def day(self) -> date:
        return self.vector.day

    def stored_settings(self, provider: str) -> ProviderSettingsView | None:
        """The provider's stored settings; None when none are stored, they were deleted, or they no longer
        validate (prepare then resolves from the catalog defaults and says so)."""
        return self.stored.get(provider)

    def price(self, provider: str) -> PriceVersionView | None:
        return self.prices.get(provider)

    def with_provider_settings(
        self, provider: str, settings: ProviderSettings | None, *, updated_by: str
    ) -> SettingsSnapshot:
        """A copy with `settings` in place of the provider's stored ones (None: as if none were stored), so that
        core.generation.prepare resolves and prices a draft or a proposed edit exactly as a request would.
        Nothing is stored. The draft keeps the stored version number (0 when none) and `updated_by` names who
        proposes it. The copy keeps this snapshot's vector, so it must never go into a SettingsCache."""
        stored = dict(self.stored)
        if settings is None:
            stored.pop(provider, None)
        else:
            current = stored.get(provider)
            stored[provider] = ProviderSettingsView(
                provider=provider,
                version=current.version if current is not None else 0,
                settings=settings,
                updated_at=datetime.now(UTC),
                updated_by=updated_by,
                comment=None,
            )
        return replace(self, stored=MappingProxyType(stored))

    def routing_settings(self) -> dict[str, ProviderSettings]:
        """Every usable provider's settings: stored, or the catalog defaults for one nobody configured.
        Deleted providers and providers with invalid stored settings are left out (see `problems`).
        A new dict each call (the caller may change it); the settings in it are immutable and shared."""
        return dict(self._routing)

    @cached_property
    def _routing(self) -> Mapping[str, ProviderSettings]:
        # Computed once per snapshot, not per request: catalog defaults are pydantic models to validate.
        out: dict[str, ProviderSettings] = {}
        for provider in PROVIDERS:
            if provider in self.deleted or provider in self.invalid:
                continue
            view = self.stored.get(provider)
            out[provider] = view.settings if view is not None else default_provider_settings(provider)
        return MappingProxyType(out)

    def price_table(self) -> PriceTable:
        """The prices in force as a core.pricing PriceTable (built once per snapshot)."""
        return self._price_table

    @cached_property
    def _price_table(self) -> PriceTable:
        return PriceTable(
            version=f"db-{self.day.isoformat()}",
            description="prices in force on this day, from the price_versions table",
            prices={provider: view.price for provider, view in self.prices.items()},
        )

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(f"{provider}: {reason}" for provider, reason in sorted(self.invalid.items()))


def _provider_views(session: Session) -> tuple[dict[str, ProviderSettingsView], set[str], dict[str, str]]:
    query = select(ProviderSettingsCurrent, ProviderSettingsVersion).join(
        ProviderSettingsVersion, ProviderSettingsVersion.id == ProviderSettingsCurrent.current_version_id
    )
    stored: dict[str, ProviderSettingsView] = {}
    deleted: set[str] = set()
    invalid: dict[str, str] = {}
    for pointer, row in session.execute(query).tuples():
        if pointer.provider not in PROVIDERS:
            continue  # a provider the catalog no longer has: nothing can route to it
        if pointer.deleted:
            deleted.add(pointer.provider)
            continue
        try:
            settings = ProviderSettings.model_validate(dict(row.settings))
        except ValidationError as error:
            invalid[pointer.provider] = (
                f"stored settings version {row.version} no longer pass validation (the catalog changed?): "
                f"{error.error_count()} problem(s); save corrected settings to fix them"
            )
            continue
        stored[pointer.provider] = ProviderSettingsView(
            provider=pointer.provider,
            version=row.version,
            settings=settings,
            updated_at=row.created_at,
            updated_by=row.created_by_name,
            comment=row.comment,
        )
    return stored, deleted, invalid


def load_snapshot(
    session: Session, day: date | None = None, *, vector: VersionVector | None = None
) -> SettingsSnapshot:
    """Read a consistent snapshot: vector, global settings, providers, prices, vector again (see the module
    docstring). `vector`, when the caller just read it in this session, saves the first query."""
    on = day or _utc_today()
    first = vector if vector is not None and vector.day == on else version_vector(session, on)
    for attempt in range(RELOAD_TRIES):
        global_view = settings_service.get_global_settings(session)
        stored, deleted, invalid = _provider_views(session)
        prices = price_store.active_prices(session, on)
        last = version_vector(session, on)
        if last == first or attempt == RELOAD_TRIES - 1:
            break
        first = last
    return SettingsSnapshot(
        vector=first,
        global_settings=global_view,
        stored=MappingProxyType(stored),
        deleted=frozenset(deleted),
        invalid=MappingProxyType(invalid),
        prices=MappingProxyType(prices),
    )


class SettingsCache:
    """The process's settings and prices, re-validated by one query per `get()` and reloaded on a change.

    `recheck_after_s` > 0 skips even that query for a snapshot checked less than that long ago (a change is
    then seen up to that late); the default 0 checks on every call, so a saved setting applies to the very next
    request in every process."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        today: Callable[[], date] = _utc_today,
        recheck_after_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if recheck_after_s < 0:
            raise ValueError("recheck_after_s cannot be negative")
        self._factory = factory
        bind = factory.kw.get("bind")
        self._engine: Engine | None = bind if isinstance(bind, Engine) else None
        self._today = today
        self._recheck_after_s = recheck_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot: SettingsSnapshot | None = None
        self._checked_at = 0.0
        self.loads = 0
        """Reloads so far (the first load included)."""

    def get(self) -> SettingsSnapshot:
        """The current snapshot. Blocking (one query when warm): from async code use `aget()`."""
        cached = self._snapshot
        if (
            cached is not None
            and self._recheck_after_s > 0
            and self._clock() - self._checked_at < self._recheck_after_s
            and cached.day == self._today()
        ):
            return cached
        day = self._today()
        vector = self._read_vector(day)
        if cached is not None and cached.vector == vector:
            self._checked_at = self._clock()
            return cached
        with self._lock:
            latest = self._snapshot
            if latest is not None and latest.vector == vector:
                return latest  # another thread reloaded while this one waited for the lock
            with self._factory() as session:
                fresh = load_snapshot(session, day, vector=vector)
            self._snapshot = fresh
            self._checked_at = self._clock()
            self.loads += 1
            return fresh

    def _read_vector(self, day: date) -> VersionVector:
        if self._engine is not None:  # a bare connection costs half what a Session does on SQLite
            with self._engine.connect() as connection:
                return version_vector(connection, day)
        with self._factory() as session:
            return version_vector(session, day)

    async def aget(self) -> SettingsSnapshot:
        """`get()` on the database executor: the event loop never waits on the version query."""
        return await run_db(self.get)

    def invalidate(self) -> None:
        """Forget the snapshot: the next `get()` reloads (after a save in this process, say; not needed for
        correctness, since the version vector sees every committed change)."""
        with self._lock:
            self._snapshot = None
