"""What a request's estimate depends on beyond settings and prices, read once per request: the month's live
units for providers whose price has volume tiers (core.spend.tiers), and the requesting user's own preferences
(core.preferences). The service and the Playground's estimate both read it here, so they price alike."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy.orm import Session

from core.generation.snapshot import SettingsSnapshot
from core.preferences import preferences_for_request
from core.settings import UserPreferenceValues
from core.spend.tiers import month_to_date_units
from db.models import utcnow

__all__ = ["RequestContext", "read_request_context"]


@dataclass(frozen=True)
class RequestContext:
    units_this_month: Mapping[str, Decimal] = field(default_factory=dict)
    """Live units so far this UTC month, only for providers whose price has volume tiers."""
    preferences: UserPreferenceValues | None = None


def read_request_context(
    session: Session, snapshot: SettingsSnapshot, user_id: int | None, now: datetime | None = None
) -> RequestContext:
    """At most one rollup query per tiered provider and one preferences lookup (none when nothing needs them)."""
    moment = now or utcnow()
    units = {
        provider: month_to_date_units(session, provider, moment, price=price.price)
        for provider, price in snapshot.prices.items()
        if price is not None and price.price.tiers
    }
    preferences = None
    if user_id is not None and snapshot.global_settings.settings.user_preference_fields:
        preferences = preferences_for_request(session, user_id)
    return RequestContext(units, preferences)
