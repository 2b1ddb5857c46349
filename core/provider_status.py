"""One read of each provider's operational state, for the console's Providers page.

It arranges what other modules work out and decides nothing itself: health and the breaker
(core.generation.health / breaker), the key (core.keys, masked), the connection mode (core.providers.registry),
success rate and latency from the daily rollups (core.generation.usage.usage_summary, in the provider's current
connection mode: never a scan of usage_attempts), and slots in flight and waiters queued
(core.generation.limits). Reads only; no authorization (the page is staff-only, and nothing here is secret).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy.orm import Session

from core.catalog import PROVIDERS
from core.generation import limits
from core.generation.breaker import BreakerSnapshot
from core.generation.health import HealthStatus, health_report
from core.generation.usage import usage_summary
from core.keys import key_status

__all__ = ["RECENT_DAYS", "ProviderStatus", "provider_statuses"]

RECENT_DAYS = 7
"""The rollup window for success rate and latency: today and the six UTC days before."""


@dataclass(frozen=True)
class ProviderStatus:
    provider: str
    label: str
    mode: str
    """live | emulator | sandbox."""
    key: str
    """Masked (`fal-…a1b2 (36 chars)`) or "not set"."""
    health: HealthStatus
    health_reason: str
    breaker: BreakerSnapshot
    since_day: date
    attempts: int
    """Attempts in the rollups since `since_day`, in the current connection mode."""
    succeeded: int
    p50_ms: float | None
    p95_ms: float | None
    in_flight: int
    queued: int

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.attempts if self.attempts else None


def provider_statuses(session: Session, now: datetime | None = None) -> list[ProviderStatus]:
    """Every catalog provider, in catalog order."""
    moment = datetime.now(UTC) if now is None else now
    report = health_report(session, moment)
    today = moment.astimezone(UTC).date()
    since = today - timedelta(days=RECENT_DAYS - 1)
    rows = usage_summary(session, date_from=since, date_to=today, by=("provider", "mode"))
    by_key = {(r.group["provider"], r.group["mode"]): r for r in rows}
    out: list[ProviderStatus] = []
    for health in report:
        figures = by_key.get((health.provider, health.mode.value))
        out.append(
            ProviderStatus(
                provider=health.provider,
                label=health.label,
                mode=health.mode.value,
                key=key_status(PROVIDERS[health.provider]).masked,
                health=health.status,
                health_reason=health.reason,
                breaker=health.breaker,
                since_day=since,
                attempts=figures.attempts if figures else 0,
                succeeded=figures.succeeded if figures else 0,
                p50_ms=figures.p50_ms if figures else None,
                p95_ms=figures.p95_ms if figures else None,
                in_flight=len(limits.holders(session, health.provider)),
                queued=len(limits.waiters(session, health.provider)),
            )
        )
    return out
