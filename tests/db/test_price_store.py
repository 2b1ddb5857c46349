"""Prices in the database: versions on change, audit rows, the price in force on a day."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput, PermissionDenied
from core import audit, price_store
from core.security import Actor, Role
from db.engine import transaction

ADMIN = Actor.system("ada")  # the process itself; people are authorized from their accounts (test_authz)
USER = Actor(user_id=None, username="ursula", role=Role.USER)


def _fal(usd: str, effective: str) -> dict[str, Any]:
    return {
        "provider": "fal-qwen",
        "unit": "megapixel",
        "usd_per_unit": usd,
        "source": "https://fal.ai/models/fal-ai/qwen-image",
        "effective_date": effective,
    }


def test_new_version_on_change_with_audit_and_none_when_unchanged(db_session_factory: sessionmaker[Session]) -> None:
    with transaction(db_session_factory) as session:
        first = price_store.add_price_version(session, ADMIN, _fal("0.02", "2026-09-01"))
        same = price_store.add_price_version(session, ADMIN, _fal("0.020", "2026-09-01"))
        second = price_store.add_price_version(session, ADMIN, _fal("0.025", "2026-12-01"), comment="price rise")
    assert (first.changed, first.current.version) == (True, 1)
    assert (same.changed, same.current.version) == (False, 1)
    assert (second.changed, second.current.version) == (True, 2)
    with db_session_factory() as session:
        assert [v.version for v in price_store.list_price_versions(session, "fal-qwen")] == [2, 1]
        entries = audit.list_entries(session, ADMIN, target_type="price")
    assert [e.action for e in entries] == ["price.update", "price.create"]
    assert entries[0].changed_fields()["usd_per_unit"] == ("0.02", "0.025")
    assert entries[0].comment == "price rise"


def test_price_in_force_is_the_latest_effective_on_the_day(db_session_factory: sessionmaker[Session]) -> None:
    with transaction(db_session_factory) as session:
        price_store.add_price_version(session, ADMIN, _fal("0.02", "2026-09-01"))
        price_store.add_price_version(session, ADMIN, _fal("0.03", "2027-01-01"))  # announced for later
        price_store.add_price_version(
            session,
            ADMIN,
            {"provider": "qwen", "unit": "free", "source": "Hugging Face ZeroGPU", "effective_date": "2026-01-01"},
        )
    with db_session_factory() as session:
        assert price_store.active_price(session, "fal-qwen", date(2026, 8, 31)) is None
        in_force = price_store.active_price(session, "fal-qwen", date(2026, 12, 31))
        assert in_force is not None and str(in_force.price.usd_per_unit) == "0.02"
        later = price_store.active_price(session, "fal-qwen", date(2027, 1, 1))
        assert later is not None and later.version == 2
        table = price_store.active_price_table(session, date(2026, 11, 27))
        versions = price_store.active_prices(session, date(2026, 11, 27))
    assert set(table.prices) == {"fal-qwen", "qwen"} and versions["fal-qwen"].version == 1
    estimate = table.estimate("fal-qwen", {"image_size": "square_hd", "num_images": 1})
    assert estimate.micro_usd == 20972  # 1.048576 MP x $0.02, rounded half up once


def test_bad_prices_and_users_are_refused(db_session_factory: sessionmaker[Session]) -> None:
    with pytest.raises(PermissionDenied), transaction(db_session_factory) as session:
        price_store.add_price_version(session, USER, _fal("0.02", "2026-09-01"))
    with pytest.raises(InvalidInput) as caught, transaction(db_session_factory) as session:
        price_store.add_price_version(session, ADMIN, _fal("-1", "2026-09-01"))
    assert "usd_per_unit" in caught.value.field_errors
    with db_session_factory() as session:
        assert price_store.list_price_versions(session) == []
