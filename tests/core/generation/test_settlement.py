"""Settlement: the actual cost of an attempt from its billing facts and its own price version."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from common.errors import Billing, InvalidInput
from core.generation.prepare import prepare
from core.generation.settlement import Settlement, actual_cost, price_units, require_price
from core.pricing import ProviderPrice, estimate_cost, load_default_prices, parse_price
from tests.core.generation.usage_fixtures import seeded_price_ids

PRICES = load_default_prices().prices
FAL, IDEOGRAM, HF, QWEN, SANDBOX = (PRICES[p] for p in ("fal-qwen", "ideogram", "huggingface", "qwen", "sandbox"))
B, NB, U = Billing.BILLED, Billing.NOT_BILLED, Billing.UNKNOWN


@pytest.mark.parametrize(
    ("price", "billing", "units", "params", "mode", "expected"),
    [
        # billed with units: the attempt's price applied to what the provider billed
        (FAL, B, Decimal("1.048576"), {}, "live", Settlement(20_972, B, Decimal("1.048576"), False, "billed_units")),
        (FAL, B, Decimal("4.194304"), {}, "live", Settlement(83_886, B, Decimal("4.194304"), False, "billed_units")),
        (FAL, B, Decimal(0), {}, "live", Settlement(0, B, Decimal(0), False, "billed_units")),
        (IDEOGRAM, B, Decimal(2), {"rendering_speed": "QUALITY"}, "live",
         Settlement(180_000, B, Decimal(2), False, "billed_units")),
        (IDEOGRAM, B, Decimal(3), {"rendering_speed": "turbo"}, "live",
         Settlement(90_000, B, Decimal(3), False, "billed_units")),
        (IDEOGRAM, B, Decimal(1), {}, "live", Settlement(60_000, B, Decimal(1), False, "billed_units")),
        (HF, B, Decimal("2.097152"), {}, "live", Settlement(20_972, B, Decimal("2.097152"), False, "billed_units")),
        # billed without units: the estimate
        (FAL, B, None, {}, "live", Settlement(12_345, B, None, False, "estimate")),
        (IDEOGRAM, B, None, {"rendering_speed": "QUALITY"}, "live", Settlement(12_345, B, None, False, "estimate")),
        # not billed: 0; unknown: None (held at the estimate by budgets)
        (FAL, NB, None, {}, "live", Settlement(0, NB, None, False, "not_billed")),
        (FAL, U, None, {}, "live", Settlement(None, U, None, False, "unknown")),
        (FAL, U, Decimal("0.5"), {}, "live", Settlement(None, U, Decimal("0.5"), False, "unknown")),
        # free providers: 0 and not billed, whatever the adapter could tell
        (QWEN, B, None, {}, "live", Settlement(0, NB, None, False, "free")),
        (QWEN, U, None, {}, "live", Settlement(0, NB, None, False, "free")),
        (QWEN, NB, None, {}, "emulator", Settlement(0, NB, None, True, "free")),
        (SANDBOX, B, None, {}, "sandbox", Settlement(0, NB, None, True, "free")),
        # emulator and sandbox runs of a paid provider: the same would-be cost, labelled simulated
        (FAL, B, Decimal("1.048576"), {}, "emulator", Settlement(20_972, B, Decimal("1.048576"), True, "billed_units")),
        (IDEOGRAM, B, None, {}, "sandbox", Settlement(12_345, B, None, True, "estimate")),
        (FAL, U, None, {}, "sandbox", Settlement(None, U, None, True, "unknown")),
    ],
)  # fmt: skip
def test_the_settlement_table(
    price: ProviderPrice, billing: Billing, units: Decimal | None, params: dict[str, Any], mode: str,
    expected: Settlement,
) -> None:  # fmt: skip
    got = actual_cost(
        price=price, billing=billing, billed_units=units, estimated_micro_usd=12_345, params=params, mode=mode
    )
    assert got == expected


def test_billed_units_are_rounded_once_half_up() -> None:
    # 1.048576 MP x $0.05 = $0.0524288 -> 52 429 micro-dollars (the design document's worked example)
    price = parse_price({**FAL.model_dump(mode="json"), "usd_per_unit": "0.05"})
    assert price_units(price, Decimal("1.048576")) == 52_429
    # 0.0000005 MP x $1 = half a micro-dollar: rounds up
    one = parse_price({**FAL.model_dump(mode="json"), "usd_per_unit": "1"})
    assert price_units(one, Decimal("0.0000005")) == 1
    assert price_units(one, Decimal("0.0000004")) == 0


def _tiered() -> ProviderPrice:
    return parse_price(
        {
            **FAL.model_dump(mode="json"),
            "usd_per_unit": "0.05",
            "tiers": [{"from_units": "10", "usd_per_unit": "0.03"}, {"from_units": "20", "usd_per_unit": "0.01"}],
        }
    )


@pytest.mark.parametrize("used", [Decimal(0), Decimal("9.5"), Decimal("19"), Decimal(25)])
@pytest.mark.parametrize(
    ("price_name", "params"),
    [
        ("fal-qwen", {"image_size": "square_hd", "num_images": 1}),
        ("fal-qwen", {"image_size": "landscape_16_9", "num_images": 4}),
        ("tiered", {"image_size": "1536x1024", "num_images": 4}),
        ("tiered", {"image_size": "square_hd", "num_images": 3}),
        ("ideogram", {"rendering_speed": "TURBO", "num_images": 3}),
        ("ideogram", {"num_images": 2}),
        ("huggingface", {"image_size": "portrait_4_3", "num_images": 2}),
    ],
)
def test_billed_units_equal_to_the_estimates_cost_what_the_estimate_said(
    price_name: str, params: dict[str, Any], used: Decimal
) -> None:
    """Settlement and estimation apply one price the same way (volume tiers split at their boundaries too)."""
    price = _tiered() if price_name == "tiered" else PRICES[price_name]
    estimate = estimate_cost(price, provider_id=price.provider, params=params, units_used_this_month=used)
    settled = actual_cost(
        price=price, billing=B, billed_units=estimate.units, estimated_micro_usd=estimate.micro_usd,
        params=params, units_used_this_month=used,
    )  # fmt: skip
    assert settled.actual_micro_usd == estimate.micro_usd
    assert settled.basis == "billed_units"


def test_impossible_facts_and_unusable_prices_are_errors() -> None:
    with pytest.raises(ValueError, match="billed units"):
        actual_cost(price=FAL, billing=NB, billed_units=Decimal(1), estimated_micro_usd=1)
    with pytest.raises(ValueError, match="mode"):
        actual_cost(price=FAL, billing=B, billed_units=None, estimated_micro_usd=1, mode="simulated")
    with pytest.raises(ValueError, match="negative"):
        price_units(FAL, Decimal(-1))
    with pytest.raises(ValueError, match="no ideogram price"):
        price_units(IDEOGRAM, Fraction(1), params={"rendering_speed": "WARP"})
    broken = ProviderPrice.unusable(
        provider="fal-qwen", rule={"unit": "megapixel"}, source="hand edit", effective_date=date(2026, 1, 1),
        problem="usd_per_unit missing",
    )  # fmt: skip
    with pytest.raises(ValueError, match="cannot be used"):
        actual_cost(price=broken, billing=B, billed_units=Decimal(1), estimated_micro_usd=1)
    with pytest.raises(ValueError, match="cannot be used"):
        actual_cost(price=broken, billing=NB, billed_units=None, estimated_micro_usd=0)


def test_an_unpriced_provider_is_refused_before_any_attempt(db_session_factory: sessionmaker[Session]) -> None:
    """No price in force: prepare says the request is not runnable and `require_price` refuses it; never $0."""
    with db_session_factory() as session:
        unpriced = prepare(session, "fal-qwen", prompt="a fox")
    assert unpriced.price is None and unpriced.estimate is None and not unpriced.runnable
    with pytest.raises(InvalidInput, match="no price in force"):
        require_price(unpriced)

    ids = seeded_price_ids(db_session_factory)
    with db_session_factory() as session:
        priced = prepare(session, "fal-qwen", prompt="a fox")
    assert priced.runnable
    assert require_price(priced) == ids["fal-qwen"]
    # A price in force that cannot price this request (an unusable stored rule, say) is refused too.
    unpriceable = replace(priced, estimate=None, problems=("cannot price these settings: no usd_per_unit",))
    with pytest.raises(InvalidInput, match="cannot price these settings"):
        require_price(unpriceable)
