"""What spend intelligence feeds into generate(): the month's live volume places each estimate (and its
settlement) on the price's volume tiers, and a user's own preferences sit between provider settings and preset."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core import playground, price_store
from core.generation.models import GenerationRequest
from core.generation.service import generate_sync
from core.preferences import save_preferences
from core.security import Actor
from core.spend import reports
from db.engine import transaction
from db.models import UsageDailyRollup
from tests.core.generation.service_support import attempts, make_user

SYSTEM = Actor.system("tests")
FAL_DEFAULT = 15_729  # 1024x768 = 0.786432 MP at $0.02/MP


pytestmark = pytest.mark.usefixtures("sandbox_only")


def test_a_users_preferences_reach_the_request(factory: sessionmaker[Session]) -> None:
    erin = make_user(factory, "erin")
    assert erin.user_id is not None
    with transaction(factory) as session:
        save_preferences(
            session, erin, erin.user_id, {"image_size": "square", "negative_prompt": "blurry"}, expected_version=0
        )
    request = GenerationRequest("a fox", provider="fal-qwen", allow_fallback=False)
    result = generate_sync(request, erin, factory=factory)
    [row] = attempts(factory, result.generation_id)
    assert row.effective_params["image_size"] == "square" and row.effective_params["negative_prompt"] == "blurry"
    # 512x512 = 0.262144 MP at $0.02/MP = $0.00524288, rounded half up once.
    assert result.cost.estimated_micro_usd == 5_243
    # Someone without preferences gets the provider's settings; a request's own value beats the preference.
    other = generate_sync(request, SYSTEM, factory=factory)
    assert attempts(factory, other.generation_id)[0].effective_params["image_size"] == "landscape_4_3"
    own = generate_sync(
        GenerationRequest("a fox", provider="fal-qwen", params={"image_size": "landscape_4_3"}, allow_fallback=False),
        erin,
        factory=factory,
    )
    assert own.cost.estimated_micro_usd == FAL_DEFAULT


def test_the_months_live_volume_puts_estimate_and_settlement_on_the_tier(factory: sessionmaker[Session]) -> None:
    today = datetime.now(UTC).date()
    with transaction(factory) as session:
        price_store.add_price_version(
            session,
            SYSTEM,
            {
                "provider": "fal-qwen",
                "unit": "megapixel",
                "usd_per_unit": "0.02",
                "tiers": [{"from_units": "1", "usd_per_unit": "0.01"}],
                "source": "test: a volume discount from the second megapixel of the month",
                "effective_date": today.isoformat(),
            },
        )
    request = GenerationRequest("a fox", provider="fal-qwen", allow_fallback=False)
    before = generate_sync(request, SYSTEM, factory=factory)
    assert before.cost.estimated_micro_usd == FAL_DEFAULT  # sandbox runs are simulated: no live units yet
    with transaction(factory) as session:
        session.add(
            UsageDailyRollup(
                day=today, provider="fal-qwen", user_id=0, mode="live", status="succeeded", error_class="",
                attempts=3, images=3, megapixels_micro=2_000_000,
            )
        )  # fmt: skip
    after = generate_sync(request, SYSTEM, factory=factory)
    # 2 live MP used this month: the whole request is in the $0.01/MP band: 0.786432 x 0.01 = $0.00786432.
    assert after.cost.estimated_micro_usd == 7_864 and after.cost.actual_micro_usd == 7_864


def test_the_playground_estimate_prices_like_generate(factory: sessionmaker[Session]) -> None:
    erin = make_user(factory, "erin")
    assert erin.user_id is not None
    with transaction(factory) as session:
        save_preferences(session, erin, erin.user_id, {"image_size": "square"}, expected_version=0)
    request = GenerationRequest("a fox", provider="fal-qwen", allow_fallback=False)
    with factory() as session:
        shown = playground.estimate(session, request, user_id=erin.user_id)
    ran = generate_sync(request, erin, factory=factory)
    assert shown.estimate_micro_usd == ran.cost.estimated_micro_usd == 5_243


def test_spend_is_reported_by_the_preset_each_attempt_ran_with(factory: sessionmaker[Session]) -> None:
    fast = generate_sync(GenerationRequest("a fox", provider="fal-qwen", preset="fast"), SYSTEM, factory=factory)
    plain = generate_sync(GenerationRequest("a fox", provider="fal-qwen", preset="none"), SYSTEM, factory=factory)
    assert attempts(factory, fast.generation_id)[0].preset == "fast"
    assert attempts(factory, plain.generation_id)[0].preset == ""
    today = datetime.now(UTC).date()
    with factory() as session:
        report = reports.build_report(session, date_from=today, date_to=today, by="preset")
    spent = {row.key: row.actual_micro_usd for row in report.rows}
    assert spent == {"fast": fast.cost.actual_micro_usd, "": plain.cost.actual_micro_usd}
