"""Volume tiers in effect: month-to-date units from the rollups (live only), a boundary crossed mid-month and
inside one request, and a new month starting over. Figures worked out by hand in each test."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core import price_store
from core.pricing import estimate_cost, parse_price
from core.security import Actor
from core.seed import seed_defaults
from core.spend.tiers import month_to_date_units, tier_position
from db.engine import transaction
from tests.core.spend.rollup_seed import add_rollup

TIERED_FAL = {
    "provider": "fal-qwen",
    "unit": "megapixel",
    "usd_per_unit": "0.02",
    "tiers": [{"from_units": "1000", "usd_per_unit": "0.015"}, {"from_units": "5000", "usd_per_unit": "0.01"}],
    "source": "test: a tiered fal price",
    "effective_date": "2026-09-01",
}
SQUARE = {"image_size": "1024x1024", "num_images": 1}  # 1.048576 MP


@pytest.fixture
def factory(db_session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    seed_defaults(db_session_factory)
    with transaction(db_session_factory) as s:
        price_store.add_price_version(s, Actor.system("test"), TIERED_FAL)
    return db_session_factory


def test_month_to_date_counts_live_units_of_this_month_only(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        add_rollup(s, date(2026, 11, 2), "fal-qwen", images=400, megapixels_micro=400_000_000)  # 400 MP
        add_rollup(s, date(2026, 11, 14), "fal-qwen", user_id=0, status="failed", error_class="timeout")
        add_rollup(s, date(2026, 11, 14), "fal-qwen", images=3, megapixels_micro=3_145_728)  # 3.145728 MP
        add_rollup(s, date(2026, 10, 31), "fal-qwen", images=900, megapixels_micro=900_000_000)  # last month
        add_rollup(s, date(2026, 11, 3), "fal-qwen", mode="sandbox", images=800, megapixels_micro=800_000_000)
        add_rollup(s, date(2026, 11, 3), "fal-qwen", mode="emulator", images=800, megapixels_micro=800_000_000)
        add_rollup(s, date(2026, 11, 3), "huggingface", images=50, megapixels_micro=50_000_000)
        add_rollup(s, date(2026, 11, 20), "fal-qwen", images=10, megapixels_micro=10_000_000)  # after "now"
        add_rollup(s, date(2026, 11, 3), "ideogram", images=7)
    now = datetime(2026, 11, 15, 9, 30, tzinfo=UTC)
    with factory() as s:
        assert month_to_date_units(s, "fal-qwen", now) == Decimal("403.145728")
        assert month_to_date_units(s, "huggingface", now) == Decimal(50)
        assert month_to_date_units(s, "ideogram", now) == Decimal(7)  # per-image price: images
        with pytest.raises(ValueError, match="naive"):
            month_to_date_units(s, "fal-qwen", datetime(2026, 11, 15))


def test_boundary_crossed_mid_month_and_inside_one_request(factory: sessionmaker[Session]) -> None:
    price = parse_price(TIERED_FAL)
    with transaction(factory) as s:
        add_rollup(s, date(2026, 11, 5), "fal-qwen", images=900, megapixels_micro=900_000_000)
    early = datetime(2026, 11, 10, tzinfo=UTC)
    with factory() as s:
        used = month_to_date_units(s, "fal-qwen", early, price=price)
    assert used == Decimal(900)
    before = estimate_cost(price, provider_id="fal-qwen", params=SQUARE, units_used_this_month=used)
    # Below 1,000 MP: 1.048576 MP x $0.02 = $0.02097152 -> 20,972 micro-USD, in the base band.
    assert before.micro_usd == 20_972
    assert before.tiers_used == ("0-1000 MP/month at $0.02 per MP",)

    with transaction(factory) as s:
        add_rollup(s, date(2026, 11, 12), "fal-qwen", images=95, megapixels_micro=99_500_000)  # +99.5 MP
    crossing = datetime(2026, 11, 12, 18, tzinfo=UTC)
    with factory() as s:
        used = month_to_date_units(s, "fal-qwen", crossing, price=price)
    assert used == Decimal("999.5")
    split = estimate_cost(price, provider_id="fal-qwen", params=SQUARE, units_used_this_month=used)
    # Split at 1,000 MP: 0.5 MP x $0.02 = $0.01, plus 0.548576 MP x $0.015 = $0.00822864; $0.01822864 -> 18,229.
    assert split.micro_usd == 18_229
    assert split.tiers_used == ("0-1000 MP/month at $0.02 per MP", "1000-5000 MP/month at $0.015 per MP")
    assert split.units_used_this_month == Decimal("999.5")

    with transaction(factory) as s:
        add_rollup(s, date(2026, 11, 13), "fal-qwen", images=1, megapixels_micro=1_000_000)
    with factory() as s:
        used = month_to_date_units(s, "fal-qwen", datetime(2026, 11, 13, tzinfo=UTC), price=price)
    after = estimate_cost(price, provider_id="fal-qwen", params=SQUARE, units_used_this_month=used)
    # 1,000.5 MP used: all in the $0.015 band, 1.048576 x 0.015 = $0.01572864 -> 15,729.
    assert after.micro_usd == 15_729 and after.tiers_used == ("1000-5000 MP/month at $0.015 per MP",)

    # A new month starts at the base price again.
    with factory() as s:
        december = month_to_date_units(s, "fal-qwen", datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC), price=price)
    assert december == 0


def test_tier_position() -> None:
    price = parse_price(TIERED_FAL)
    position = tier_position(price, Decimal("999.5"))
    assert position is not None
    assert position.current_usd_per_unit == Decimal("0.02")
    assert (position.next_tier_from_units, position.units_to_next_tier) == (Decimal(1000), Decimal("0.5"))
    top = tier_position(price, Decimal(6000))
    assert top is not None and top.current_usd_per_unit == Decimal("0.01") and top.next_tier_from_units is None
    untiered = parse_price({**TIERED_FAL, "tiers": []})
    assert tier_position(untiered, Decimal(10)) is None
