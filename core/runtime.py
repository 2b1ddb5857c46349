"""Opening the store a process works with: engine, sessions, schema up to date, defaults present.

The console, the CLI and (later) the API call `open_runtime()` once per process.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from common.config import database_url, disable_telemetry
from core.seed import SeedReport, seed_defaults
from db import migrate
from db.engine import make_engine, safe_url, session_factory


@dataclass(frozen=True)
class Runtime:
    engine: Engine
    sessions: sessionmaker[Session]
    url: str
    seeded: SeedReport | None

    @property
    def display_url(self) -> str:
        """The database URL without its password."""
        return safe_url(self.url)


def open_runtime(url: str | None = None, *, prepare: bool = True) -> Runtime:
    """Connect; with `prepare`, migrate to head and seed missing defaults (both idempotent and cheap when done)."""
    disable_telemetry()
    resolved = url or database_url()
    report: SeedReport | None = None
    if prepare:
        migrate.upgrade(resolved)
    engine = make_engine(resolved)
    sessions = session_factory(engine)
    if prepare:
        report = seed_defaults(sessions)
    return Runtime(engine=engine, sessions=sessions, url=resolved, seeded=report)
