"""Prices in the database: one immutable version per change, per provider, with an audit row.

The price in force for a provider on a day is the version with the latest `effective_date` on or before that
day (the highest version number breaks a tie), so a price announced for next month can be entered today and
takes over by itself. Usage rows point at the version they were priced with, so history never re-prices.

A stored version that no longer validates (stored before today's bounds, or edited in the database) is read as
an unusable price (core.pricing.ProviderPrice.unusable): that provider's estimates fail with a clear error,
every other provider and every page still work. No price or comment containing a configured API key is stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.errors import InvalidInput, NotFound
from core import audit
from core.authz import authorize
from core.catalog import PROVIDERS
from core.keys import keys_in
from core.pricing import PriceTable, ProviderPrice, parse_price
from core.security import SETTINGS_EDITORS, Actor
from db.models import PriceVersion

MAX_COMMENT_CHARS = 2000


@dataclass(frozen=True)
class PriceVersionView:
    id: int
    provider: str
    version: int
    price: ProviderPrice
    created_by_name: str
    created_at: datetime
    comment: str | None


@dataclass(frozen=True)
class PriceSaveResult:
    changed: bool
    """False when the price equals the provider's latest version (nothing was written)."""
    current: PriceVersionView


def _stored_price(row: PriceVersion) -> ProviderPrice:
    try:
        return parse_price(row.rule)
    except InvalidInput as exc:
        problems = "; ".join(f"{field}: {message}" for field, message in exc.field_errors.items()) or str(exc)
        return ProviderPrice.unusable(
            provider=row.provider,
            rule=row.rule if isinstance(row.rule, Mapping) else {},
            source=row.source,
            effective_date=row.effective_date,
            problem=f"version {row.version} does not validate: {problems}",
        )


def _view(row: PriceVersion) -> PriceVersionView:
    return PriceVersionView(
        id=row.id,
        provider=row.provider,
        version=row.version,
        price=_stored_price(row),
        created_by_name=row.created_by_name,
        created_at=row.created_at,
        comment=row.comment,
    )


def _canonical(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")  # 0.020 and 0.02 are one price, stored one way
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def price_json(price: ProviderPrice) -> dict[str, Any]:
    """The stored form: exact decimal strings (never floats), written canonically so equal prices compare
    equal as JSON. An unusable stored price gives its rule as stored, so an export shows what needs fixing."""
    stored = price.stored_rule
    if stored is not None:
        return stored
    result: dict[str, Any] = _canonical(price.model_dump(mode="python"))
    return result


def _latest(session: Session, provider: str) -> PriceVersion | None:
    query = select(PriceVersion).where(PriceVersion.provider == provider).order_by(PriceVersion.version.desc()).limit(1)
    return session.scalar(query)


def latest_price_version(session: Session, provider: str) -> PriceVersionView | None:
    """The most recently entered version (whatever its effective date)."""
    row = _latest(session, provider)
    return None if row is None else _view(row)


def add_price_version(
    session: Session,
    actor: Actor,
    price: ProviderPrice | Mapping[str, Any],
    *,
    comment: str | None = None,
) -> PriceSaveResult:
    """Store `price` as the provider's next version, unless it equals the latest one."""
    who = authorize(session, actor, *SETTINGS_EDITORS, action="change prices")
    parsed = parse_price(price_json(price) if isinstance(price, ProviderPrice) else price)
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise InvalidInput("the comment is too long", {"comment": f"at most {MAX_COMMENT_CHARS} characters"})
    rule = price_json(parsed)
    secret_errors = keys_in({**rule, "comment": comment})
    if secret_errors:
        raise InvalidInput("the price contains an API key", secret_errors)
    latest = _latest(session, parsed.provider)
    if latest is not None and latest.rule == rule:
        return PriceSaveResult(changed=False, current=_view(latest))
    row = PriceVersion(
        provider=parsed.provider,
        version=(latest.version if latest is not None else 0) + 1,
        rule=rule,
        source=parsed.source,
        effective_date=parsed.effective_date,
        created_by=who.user_id,
        created_by_name=who.username,
        comment=comment.strip() or None if comment else None,
    )
    session.add(row)
    session.flush()
    audit.record(
        session,
        who,
        "price.create" if latest is None else "price.update",
        "price",
        parsed.provider,
        before=latest.rule if latest is not None else None,
        after=rule,
        comment=row.comment,
    )
    return PriceSaveResult(changed=True, current=_view(row))


def list_price_versions(session: Session, provider: str | None = None, *, limit: int = 200) -> list[PriceVersionView]:
    """Price versions, newest first (one provider's, or everyone's)."""
    if provider is not None and provider not in PROVIDERS:
        raise InvalidInput(f"unknown provider {provider!r}", {"provider": f"unknown provider {provider!r}"})
    query = select(PriceVersion).order_by(PriceVersion.provider, PriceVersion.version.desc()).limit(limit)
    if provider is not None:
        query = query.where(PriceVersion.provider == provider)
    return [_view(r) for r in session.scalars(query)]


def get_price_version(session: Session, version_id: int) -> PriceVersionView:
    row = session.get(PriceVersion, version_id)
    if row is None:
        raise NotFound(f"no price version with id {version_id}")
    return _view(row)


def _today() -> date:
    return datetime.now(UTC).date()


def active_price(session: Session, provider: str, on: date | None = None) -> PriceVersionView | None:
    """The provider's price in force on `on` (default: today, UTC); None when it has none yet."""
    day = on or _today()
    query = (
        select(PriceVersion)
        .where(PriceVersion.provider == provider, PriceVersion.effective_date <= day)
        .order_by(PriceVersion.effective_date.desc(), PriceVersion.version.desc())
        .limit(1)
    )
    row = session.scalar(query)
    return None if row is None else _view(row)


def active_prices(session: Session, on: date | None = None) -> dict[str, PriceVersionView]:
    """Every priced provider's price in force on `on`, with the version ids usage rows record."""
    day = on or _today()
    ranked = (
        select(
            PriceVersion.id,
            func.row_number()
            .over(
                partition_by=PriceVersion.provider,
                order_by=(PriceVersion.effective_date.desc(), PriceVersion.version.desc()),
            )
            .label("rank"),
        )
        .where(PriceVersion.effective_date <= day)
        .subquery()
    )
    query = select(PriceVersion).join(ranked, ranked.c.id == PriceVersion.id).where(ranked.c.rank == 1)
    return {row.provider: _view(row) for row in session.scalars(query)}


def active_price_table(session: Session, on: date | None = None) -> PriceTable:
    """The prices in force as a core.pricing PriceTable, for estimates."""
    day = on or _today()
    prices = active_prices(session, day)
    return PriceTable(
        version=f"db-{day.isoformat()}",
        description="prices in force on this day, from the price_versions table",
        prices={provider: view.price for provider, view in prices.items()},
    )
