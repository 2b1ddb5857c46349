"""Micro-dollar helpers, price models and cost estimates."""

from __future__ import annotations

import json
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from common.errors import InvalidInput
from core.catalog import PROVIDERS
from core.money import MICRO, format_usd, micros_to_usd, round_half_up_micros, usd_to_micros
from core.pricing import (
    CostEstimate,
    PriceTable,
    PriceUnit,
    ProviderPrice,
    estimate_cost,
    load_default_prices,
    parse_price,
    parse_price_table,
)
from core.settings import resolve_effective

DAY = date(2026, 1, 1)


def per_mp(usd: str, provider: str = "fal-qwen", tiers=()) -> ProviderPrice:
    return ProviderPrice(
        provider=provider,
        unit=PriceUnit.MEGAPIXEL,
        usd_per_unit=Decimal(usd),
        tiers=tiers,
        source="test",
        effective_date=DAY,
    )


def est(price: ProviderPrice, used: Decimal | int = 0, **params) -> CostEstimate:
    return estimate_cost(price, provider_id=price.provider, params=params, units_used_this_month=used)


# ---------------------------------------------------------------------------------------------------------------
# money
# ---------------------------------------------------------------------------------------------------------------


def test_usd_to_micros_is_exact():
    assert usd_to_micros("0.052429") == 52_429
    assert usd_to_micros(Decimal("1.5")) == 1_500_000
    assert usd_to_micros(3) == 3_000_000
    assert usd_to_micros("$1,234.000001") == 1_234_000_001


def test_fractions_of_a_micro_dollar_need_a_rounding_rule():
    with pytest.raises(ValueError, match="fraction of a micro-dollar"):
        usd_to_micros("0.0524288")
    assert usd_to_micros("0.0524288", rounding=ROUND_HALF_UP) == 52_429
    with pytest.raises(ValueError, match="unknown rounding rule"):
        usd_to_micros("0.0524288", rounding="nearest")


@pytest.mark.parametrize("value", [0.05, True, None])
def test_floats_and_other_types_are_not_money(value):
    with pytest.raises(TypeError):
        usd_to_micros(value)


@pytest.mark.parametrize("value", ["abc", "NaN", "Infinity", ""])
def test_text_that_is_not_an_amount(value):
    with pytest.raises(ValueError):
        usd_to_micros(value)


def test_format_usd_shows_six_decimals():
    assert format_usd(52_429) == "$0.052429"
    assert format_usd(270_000) == "$0.270000"
    assert format_usd(1_234_567_890) == "$1,234.567890"
    assert format_usd(-1) == "-$0.000001"
    assert micros_to_usd(51_610) == Decimal("0.051610")


@pytest.mark.parametrize(
    ("amount", "micros"),
    [
        (Fraction(1, 2_000_000), 1),  # exactly half a micro-dollar rounds up
        (Fraction(49, 100_000_000), 0),
        (Fraction(-1, 2_000_000), -1),  # away from zero
        (Decimal("0.0524288"), 52_429),
        (Decimal("0.0516096"), 51_610),
        (0, 0),
    ],
)
def test_the_one_rounding_rule_is_half_up(amount, micros):
    assert round_half_up_micros(amount) == micros


@settings(deadline=None)
@given(st.integers(-(10**15), 10**15))
def test_micros_round_trip(micros):
    assert usd_to_micros(micros_to_usd(micros)) == micros
    assert usd_to_micros(format_usd(micros).replace("$", "")) == micros


# ---------------------------------------------------------------------------------------------------------------
# the design document's worked examples and other fixed cases
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "micros", "shown"),
    [("1024x1024", 52_429, "$0.052429"), ("1344x768", 51_610, "$0.051610"), ("square_hd", 52_429, "$0.052429")],
)
def test_worked_examples_at_five_cents_per_megapixel(size, micros, shown):
    e = est(per_mp("0.05"), image_size=size)
    assert e.micro_usd == micros
    assert e.formatted == shown
    assert e.unit == "megapixel"
    assert any("rounded half up" in line for line in e.breakdown)


def test_estimate_shows_its_working():
    e = est(per_mp("0.05"), image_size="1024x1024")
    assert e.units == Decimal("1.048576")
    assert e.exact_usd == Decimal("0.0524288")
    assert e.breakdown[0] == "1024x1024 = 1.048576 MP x 1 image = 1.048576 MP"
    assert e.breakdown[1] == "1.048576 MP x $0.05 per MP = $0.0524288"
    assert e.price_source == "test" and e.effective_date == DAY


def test_multi_image_requests_multiply_the_units_and_round_once():
    one = est(per_mp("0.05"), image_size="1024x1024")
    four = est(per_mp("0.05"), image_size="1024x1024", num_images=4)
    assert four.units == 4 * one.units
    assert four.micro_usd == 209_715  # 4 x 0.0524288 = 0.2097152, not 4 x 52_429 = 209_716
    assert "4 images" in four.breakdown[0]


def test_ideogram_quality_times_three_is_27_cents():
    table = load_default_prices()
    e = table.estimate("ideogram", {"rendering_speed": "QUALITY", "num_images": 3})
    assert e.micro_usd == 270_000
    assert e.formatted == "$0.270000"
    assert e.unit == "image" and e.units == 3


@pytest.mark.parametrize(("speed", "micros"), [("TURBO", 30_000), ("DEFAULT", 60_000), ("turbo", 30_000)])
def test_ideogram_price_follows_rendering_speed(speed, micros):
    assert load_default_prices().estimate("ideogram", {"rendering_speed": speed}).micro_usd == micros


def test_ideogram_without_a_speed_uses_the_catalog_default():
    assert load_default_prices().estimate("ideogram", {}).micro_usd == 60_000


def test_the_rendered_size_is_priced_not_the_asked_one():
    price = per_mp("0.01", provider="huggingface")
    e = est(price, image_size="1001x1001")  # HF needs multiples of 8: renders 1000x1000
    assert e.units == Decimal(1)
    assert e.micro_usd == 10_000
    assert e.breakdown[0].startswith("size: 1001x1001 rounded to 1000x1000")


def test_default_size_is_used_when_the_request_names_none():
    # fal-qwen's catalog default is landscape_4_3, 1024x768.
    assert est(per_mp("0.02")).units == Decimal("0.786432")


def test_estimate_from_resolved_parameters():
    eff = resolve_effective(
        "fal-qwen",
        global_settings=None,
        provider_settings=None,
        preset="fast",
        overrides={"image_size": "square_hd", "num_images": 2},
        prompt="a fox",
    )
    e = load_default_prices().estimate("fal-qwen", eff.values())
    assert e.micro_usd == round_half_up_micros(Fraction(2 * 1024 * 1024, 10**6) * Fraction(2, 100))


def test_unrenderable_size_cannot_be_priced():
    with pytest.raises(ValueError, match="cannot price"):
        est(per_mp("0.02", provider="sandbox"), image_size="9000x9000")


def test_gpu_second_per_step_and_per_image():
    per_step = ProviderPrice(
        provider="huggingface",
        unit="gpu_second",
        usd_per_unit=Decimal("0.0005"),
        seconds_per_step=Decimal("0.4"),
        source="test",
        effective_date=DAY,
    )
    e = est(per_step, num_inference_steps=30, num_images=2)
    assert e.units == Decimal(24) and e.micro_usd == 12_000 and e.unit == "gpu_second"
    per_image = ProviderPrice(
        provider="qwen",
        unit="gpu_second",
        usd_per_unit=Decimal("0.0001"),
        seconds_per_image=Decimal("60"),
        source="test",
        effective_date=DAY,
    )
    assert est(per_image).micro_usd == 6_000


def test_free_providers_cost_nothing_but_count_images():
    e = load_default_prices().estimate("qwen", {"num_images": 1})
    assert e.micro_usd == 0 and e.units == 1 and e.unit == "free"


def test_a_provider_without_a_price_is_an_error_not_free():
    table = PriceTable(version="partial", prices={"fal-qwen": per_mp("0.02")})
    with pytest.raises(KeyError, match="never treated as free"):
        table.estimate("ideogram", {})


def test_price_of_another_provider_is_refused():
    with pytest.raises(ValueError, match="is for 'fal-qwen'"):
        estimate_cost(per_mp("0.02"), provider_id="sandbox", params={})


def test_negative_month_to_date_is_refused():
    with pytest.raises(ValueError, match="cannot be negative"):
        est(per_mp("0.02"), used=-1)


# ---------------------------------------------------------------------------------------------------------------
# volume tiers
# ---------------------------------------------------------------------------------------------------------------

TIERED = per_mp("0.02", tiers=[{"from_units": "1000", "usd_per_unit": "0.015"}])


def test_request_straddling_a_tier_boundary_is_split():
    e = est(TIERED, used=Decimal("999.5"), image_size="1024x1024")
    # 0.5 MP at $0.02 + 0.548576 MP at $0.015 = $0.01822864
    assert e.exact_usd == Decimal("0.01822864")
    assert e.micro_usd == 18_229
    assert any("0.5 MP in the 0-1000 MP/month band" in line for line in e.breakdown)
    assert any("0.548576 MP in the 1000+ MP/month band" in line for line in e.breakdown)


def test_before_and_after_the_boundary():
    assert est(TIERED, used=0, image_size="1024x1024").exact_usd == Decimal("0.02097152")
    assert est(TIERED, used=1000, image_size="1024x1024").exact_usd == Decimal("0.01572864")


def test_a_request_can_span_several_tiers():
    price = per_mp(
        "0.03",
        tiers=[{"from_units": "1", "usd_per_unit": "0.02"}, {"from_units": "2", "usd_per_unit": "0.01"}],
    )
    e = est(price, used=Decimal("0.5"), image_size="2000x1500")  # 3 MP: 0.5 @ .03, 1 @ .02, 1.5 @ .01
    assert e.exact_usd == Decimal("0.05")


# ---------------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------------

_side = st.integers(64, 4096)
_price = st.decimals(min_value=Decimal("0"), max_value=Decimal("1"), places=6)


@settings(deadline=None)
@given(_price, _side, _side, _side, _side, st.integers(1, 4))
def test_estimate_is_monotonic_in_size(usd, w1, h1, w2, h2, n):
    price = per_mp(str(usd))
    small = est(price, image_size=f"{min(w1, w2)}x{min(h1, h2)}", num_images=n)
    large = est(price, image_size=f"{max(w1, w2)}x{max(h1, h2)}", num_images=n)
    assert small.micro_usd <= large.micro_usd


@settings(deadline=None)
@given(_price, _side, _side, st.integers(1, 3))
def test_estimate_is_monotonic_in_count_and_n_times_single_within_rounding(usd, w, h, n):
    price = per_mp(str(usd))
    size = f"{w}x{h}"
    single = est(price, image_size=size)
    multi = est(price, image_size=size, num_images=n)
    more = est(price, image_size=size, num_images=n + 1)
    assert multi.micro_usd <= more.micro_usd
    assert multi.exact_usd == n * single.exact_usd
    # Each rounding moves an amount by at most half a micro-dollar.
    assert abs(multi.micro_usd - n * single.micro_usd) <= Fraction(n + 1, 2)


@settings(deadline=None)
@given(
    _price,
    st.lists(
        st.decimals(min_value=Decimal("0.1"), max_value=Decimal("5000"), places=3), min_size=1, max_size=3, unique=True
    ),
    st.lists(st.decimals(min_value=Decimal("0"), max_value=Decimal("1"), places=6), min_size=3, max_size=3),
    st.decimals(min_value=Decimal("0"), max_value=Decimal("10000"), places=6),
    _side,
    _side,
)
def test_tiers_never_charge_more_than_the_base_price(base, thresholds, fractions, used, w, h):
    # Tier prices that only go down, as validation requires.
    tiers, current = [], base
    for threshold, fraction in zip(sorted(thresholds), fractions, strict=False):
        current = (current * fraction).quantize(Decimal("0.000001"))
        tiers.append({"from_units": threshold, "usd_per_unit": current})
    flat = est(per_mp(str(base)), used=used, image_size=f"{w}x{h}")
    tiered = est(per_mp(str(base), tiers=tiers), used=used, image_size=f"{w}x{h}")
    assert tiered.exact_usd <= flat.exact_usd
    assert tiered.micro_usd <= flat.micro_usd
    assert tiered.units == flat.units


@settings(deadline=None)
@given(
    st.sampled_from(list(PROVIDERS)),
    st.sampled_from(["square_hd", "1:1", "16:9", "1024x768", "832x1216", "landscape_4_3"]),
    st.integers(1, 4),
    st.decimals(min_value=Decimal("0"), max_value=Decimal("5000"), places=4),
)
def test_estimates_are_always_whole_micro_dollars_within_half_of_the_exact_amount(pid, size, n, used):
    n = min(n, int(PROVIDERS[pid].params["num_images"].maximum or 1))
    e = load_default_prices().estimate(pid, {"image_size": size, "num_images": n}, units_used_this_month=used)
    assert type(e.micro_usd) is int and e.micro_usd >= 0
    assert abs(Fraction(e.micro_usd, MICRO) - Fraction(e.exact_usd)) <= Fraction(1, 2 * MICRO)


# ---------------------------------------------------------------------------------------------------------------
# price data validation
# ---------------------------------------------------------------------------------------------------------------

_BASE = {
    "provider": "fal-qwen",
    "unit": "megapixel",
    "usd_per_unit": "0.02",
    "source": "s",
    "effective_date": "2026-01-01",
}


def _errors(**changes):
    data = {**_BASE, **changes}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(InvalidInput) as info:
        parse_price(data)
    return info.value.field_errors


def test_negative_price_is_refused():
    assert "is negative" in _errors(usd_per_unit="-0.01")["usd_per_unit"]


def test_tiers_must_ascend():
    errors = _errors(
        tiers=[{"from_units": "1000", "usd_per_unit": "0.015"}, {"from_units": "500", "usd_per_unit": "0.01"}]
    )
    assert "ascending order" in errors["tiers"]


def test_tiers_must_not_get_dearer():
    assert "dearer" in _errors(tiers=[{"from_units": "1000", "usd_per_unit": "0.03"}])["tiers"]


def test_tier_threshold_must_be_positive_and_tier_price_not_negative():
    errors = _errors(tiers=[{"from_units": "0", "usd_per_unit": "-1"}])
    assert "tiers.0.from_units" in errors and "tiers.0.usd_per_unit" in errors


def test_unknown_unit_is_refused_listing_units():
    msg = _errors(unit="per_token")["unit"]
    assert "unknown price unit 'per_token'" in msg and "megapixel, image, gpu_second, free" in msg


def test_keyed_prices_must_cover_every_choice():
    msg = _errors(
        provider="ideogram",
        unit="image",
        usd_per_unit=None,
        key_param="rendering_speed",
        keyed_usd_per_unit={"TURBO": "0.03", "DEFAULT": "0.06", "FLASH": "0.01"},
    )["keyed_usd_per_unit"]
    assert "no price for rendering_speed=QUALITY" in msg
    assert "'FLASH' is not a rendering_speed value of ideogram (TURBO, DEFAULT, QUALITY)" in msg


def test_key_param_must_be_a_choice_parameter_of_the_provider():
    msg = _errors(
        provider="ideogram", unit="image", usd_per_unit=None, key_param="seed", keyed_usd_per_unit={"1": "0.01"}
    )["key_param"]
    assert "rendering_speed, magic_prompt, style_type" in msg


def test_keyed_prices_without_key_param_and_key_param_on_megapixels():
    assert "need key_param" in _errors(keyed_usd_per_unit={"TURBO": "0.03"})["keyed_usd_per_unit"]
    assert "only for per-image" in _errors(key_param="acceleration")["key_param"]


def test_missing_price_and_gpu_estimate():
    assert "needs usd_per_unit" in _errors(usd_per_unit=None)["usd_per_unit"]
    assert "exactly one time estimate" in _errors(unit="gpu_second")["seconds_per_image"]
    assert "only for gpu_second" in _errors(seconds_per_image="3")["seconds_per_image"]
    assert (
        "no inference steps"
        in _errors(provider="ideogram", unit="gpu_second", seconds_per_step="1")["seconds_per_step"]
    )


def test_free_prices_cost_nothing():
    assert "free price cannot cost" in _errors(unit="free", usd_per_unit="0.01")["usd_per_unit"]
    free = parse_price({**_BASE, "unit": "free", "usd_per_unit": None})
    assert free.usd_per_unit == 0


def test_source_and_date_are_required():
    errors = _errors(source="", effective_date="someday")
    assert set(errors) == {"source", "effective_date"}


def test_table_keys_must_match_their_prices():
    with pytest.raises(InvalidInput) as info:
        parse_price_table({"version": "v", "prices": {"ideogram": _BASE}})
    assert "listed under 'ideogram' is for 'fal-qwen'" in str(info.value.field_errors)


def test_price_model_is_immutable():
    with pytest.raises(ValidationError):
        TIERED.usd_per_unit = Decimal(0)  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------------
# default prices and (de)serialisation
# ---------------------------------------------------------------------------------------------------------------


def test_default_prices_cover_every_provider_with_source_and_date():
    table = load_default_prices()
    assert set(table.prices) == set(PROVIDERS)
    for price in table.prices.values():
        assert price.source and price.effective_date
    assert table.prices["fal-qwen"].usd_per_unit == Decimal("0.02")
    assert "https://fal.ai/models/fal-ai/qwen-image" in table.prices["fal-qwen"].source
    assert table.prices["huggingface"].usd_per_unit == Decimal("0.01")
    assert table.prices["ideogram"].keyed_usd_per_unit == {
        "TURBO": Decimal("0.03"),
        "DEFAULT": Decimal("0.06"),
        "QUALITY": Decimal("0.09"),
    }
    assert table.prices["qwen"].unit is PriceUnit.FREE and table.prices["sandbox"].unit is PriceUnit.FREE


def test_prices_round_trip_through_json_as_decimal_strings():
    table = load_default_prices()
    text = table.to_json()
    assert PriceTable.from_json(text) == table
    raw = json.loads(text)
    assert raw["prices"]["fal-qwen"]["usd_per_unit"] == "0.02"
    one = table.prices["ideogram"]
    assert ProviderPrice.from_json(one.to_json()) == one
    assert json.loads(one.to_json())["keyed_usd_per_unit"]["QUALITY"] == "0.09"
    assert ProviderPrice.from_json(TIERED.to_json()) == TIERED


def test_describe():
    table = load_default_prices()
    assert table.prices["fal-qwen"].describe().startswith("$0.02 per MP")
    assert "QUALITY $0.09" in table.prices["ideogram"].describe()
    assert "$0.015 past 1000 MP/month" in TIERED.describe()


# --- bounds (core.money.exact_decimal) and unusable stored prices ------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("usd_per_unit", "1E+1000", "uses an exponent"),
        ("usd_per_unit", "1E+999999", "uses an exponent"),
        ("usd_per_unit", "1E+100000000", "uses an exponent"),
        ("usd_per_unit", "1000000.5", "above the maximum of 1,000,000"),
        ("usd_per_unit", "0.0000001", "more than 6 decimal places"),
        ("usd_per_unit", 0.1, "not exactly 0.1"),
        ("usd_per_unit", True, "not True"),
        ("tiers", [{"from_units": "1E+9", "usd_per_unit": "0.01"}], "uses an exponent"),
        ("tiers", [{"from_units": "1000000000001", "usd_per_unit": "0.01"}], "above the maximum"),
        ("tiers", [{"from_units": "0", "usd_per_unit": "0.01"}], "must be above 0"),
        ("tiers", [{"from_units": "10", "usd_per_unit": "1E-9"}], "uses an exponent"),
    ],
)
def test_every_amount_and_quantity_of_a_price_is_bounded(field, value, message):
    errors = _errors(**{field: value})
    assert any(message in text for text in errors.values()), errors


def test_keyed_prices_and_time_estimates_are_bounded_too():
    keyed = {"provider": "ideogram", "unit": "image", "key_param": "rendering_speed", "source": "s",
             "effective_date": "2026-01-01"}
    with pytest.raises(InvalidInput) as caught:
        parse_price({**keyed, "keyed_usd_per_unit": {"TURBO": "1E+1000", "DEFAULT": "0.06", "QUALITY": "0.09"}})
    assert "uses an exponent" in caught.value.field_errors["keyed_usd_per_unit"]
    gpu = {"provider": "huggingface", "unit": "gpu_second", "usd_per_unit": "0.001", "source": "s",
           "effective_date": "2026-01-01"}
    with pytest.raises(InvalidInput) as caught:
        parse_price({**gpu, "seconds_per_step": "1E+999999"})
    assert "uses an exponent" in caught.value.field_errors["seconds_per_step"]
    with pytest.raises(InvalidInput) as caught:
        parse_price({**gpu, "seconds_per_image": "86401"})
    assert "above the maximum of 86,400" in caught.value.field_errors["seconds_per_image"]


def test_amounts_are_stored_canonically():
    price = parse_price({**_BASE, "usd_per_unit": "0.0200", "tiers": [{"from_units": "1000.0", "usd_per_unit": 0.0}]})
    assert str(price.usd_per_unit) == "0.02"
    assert str(price.tiers[0].from_units) == "1000" and str(price.tiers[0].usd_per_unit) == "0"


def test_an_unusable_stored_price_fails_its_estimates_clearly_and_nothing_else():
    bad = ProviderPrice.unusable(
        provider="fal-qwen",
        rule={**_BASE, "usd_per_unit": "1E+1000"},
        source="s",
        effective_date=DAY,
        problem="version 3 does not validate: usd_per_unit: " + "x" * 1000,
    )
    assert bad.problem is not None and len(bad.problem) <= 300  # a hostile value never makes a page huge
    assert bad.describe().startswith("unusable stored price, enter a new one: version 3")
    assert bad.stored_rule == {**_BASE, "usd_per_unit": "1E+1000"}
    with pytest.raises(ValueError, match="the stored price of fal-qwen cannot be used; enter a new price"):
        estimate_cost(bad, provider_id="fal-qwen", params={})
    table = PriceTable(version="t", prices={"fal-qwen": bad, "sandbox": load_default_prices().prices["sandbox"]})
    assert table.estimate("sandbox", {}).micro_usd == 0  # the other providers still price
    assert parse_price(_BASE).problem is None
