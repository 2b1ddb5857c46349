"""The optimizer on a seeded history with known answers (worked out by hand in the comments), on both databases.

Prices (seeded, in force): fal-qwen $0.02/MP (here with a tier: $0.015/MP from 1,000 MP a month), Ideogram $0.03 /
$0.06 / $0.09 per image (TURBO / DEFAULT / QUALITY), Hugging Face $0.01/MP, the Qwen Space free.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput
from core import price_store, settings_service
from core.security import Actor
from core.seed import seed_defaults
from core.spend.optimizer import change_cost, recommend
from db.engine import transaction
from tests.core.spend.rollup_seed import add_rollup

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # window: Oct 21 .. Nov 19; 19.5 days of November elapsed
SYSTEM = Actor.system("test")
TIERED_FAL = {
    "provider": "fal-qwen",
    "unit": "megapixel",
    "usd_per_unit": "0.02",
    "tiers": [{"from_units": "1000", "usd_per_unit": "0.015"}],
    "source": "test: a tiered fal price",
    "effective_date": "2026-09-01",
}


@pytest.fixture
def factory(db_session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """fal-qwen set to square_hd (1024x1024) and 50 steps; the others at their defaults. History (live):
    fal-qwen 200 images (700 MP, all in November), Ideogram 100 images in the window and 50 on Oct 20 (outside),
    and 999 sandbox images (simulated: never in live advice)."""
    seed_defaults(db_session_factory)
    with transaction(db_session_factory) as s:
        price_store.add_price_version(s, SYSTEM, TIERED_FAL)
        settings_service.save_provider_settings(
            s, SYSTEM, "fal-qwen", {"params": {"image_size": "square_hd", "num_inference_steps": 50}}
        )
        add_rollup(s, date(2026, 11, 5), "fal-qwen", attempts=200, images=200, megapixels_micro=700_000_000,
                   actual_micro_usd=4_194_400)  # fmt: skip
        add_rollup(s, date(2026, 10, 25), "ideogram", attempts=104, images=100, actual_micro_usd=6_000_000)
        add_rollup(s, date(2026, 10, 20), "ideogram", attempts=50, images=50, actual_micro_usd=3_000_000)
        add_rollup(s, date(2026, 11, 6), "fal-qwen", mode="sandbox", attempts=999, images=999)
    return db_session_factory


def test_recommendations_with_known_savings(factory: sessionmaker[Session]) -> None:
    with factory() as s:
        report = recommend(s, now=NOW)
    by_id = {r.id: r for r in report.recommendations}
    assert (report.date_from, report.date_to) == (date(2026, 10, 21), date(2026, 11, 19))
    # Spend $4.1944 + $6 over 300 images = $0.033981333... -> 33,981 micro-USD per image, against $0.02.
    assert (report.spend_micro_usd, report.images) == (10_194_400, 300)
    assert report.cost_per_image_micro_usd == 33_981 and report.target_cost_per_image_micro_usd == 20_000

    # Ideogram 1:1 at DEFAULT: $0.06. Hugging Face renders 1:1 as 1024x1024 = 1.048576 MP x $0.01 = $0.01048576
    # -> 10,486. (60,000 - 10,486) x 100 images = 4,951,400 a month. fal-qwen would be 20,972: not the cheapest.
    ideogram = by_id["provider:ideogram:huggingface"]
    assert ideogram.monthly_saving_micro_usd == 4_951_400
    assert (ideogram.basis.images, ideogram.basis.requests, ideogram.basis.spend_mode) == (100, 104, "live")
    # Ideogram's nearest cheaper preset: Standard is DEFAULT (no saving), Fast is TURBO: (60,000 - 30,000) x 100.
    assert by_id["preset:ideogram:fast"].monthly_saving_micro_usd == 3_000_000
    # fal-qwen at square_hd: 1.048576 MP x $0.02 = $0.02097152 -> 20,972. square (512x512, same ratio):
    # 0.262144 MP x $0.02 = $0.00524288 -> 5,243. (20,972 - 5,243) x 200 = 3,145,800.
    assert by_id["size:fal-qwen:square"].monthly_saving_micro_usd == 3_145_800
    # The same 1024x1024 on Hugging Face: 10,486. (20,972 - 10,486) x 200 = 2,097,200.
    assert by_id["provider:fal-qwen:huggingface"].monthly_saving_micro_usd == 2_097_200
    # 50 steps > 40 (80 % of 50): time only, per-megapixel prices do not depend on steps.
    steps = by_id["steps:fal-qwen:40"]
    assert steps.monthly_saving_micro_usd == 0 and "same price" in steps.title
    # Tier: 700 MP in 19.5 days -> 700 / 19.5 x 30 = 1,076.923... MP this month; the 76.923... past 1,000 cost
    # $0.005 less each: $0.384615... -> 384,615.
    assert by_id["tier:fal-qwen:1000"].monthly_saving_micro_usd == 384_615
    assert not any(r.id.startswith("preset:fal-qwen") for r in report.recommendations)  # steps are not billed
    savings = [r.monthly_saving_micro_usd for r in report.recommendations]
    assert savings == sorted(savings, reverse=True)
    assert len(report.recommendations) == 6


def test_simulated_advice_stays_apart(factory: sessionmaker[Session]) -> None:
    with factory() as s:
        report = recommend(s, now=NOW, spend_mode="simulated")
    # Only the 999 sandbox images (fal-qwen settings): provider 999 x 10,486, size 999 x 15,729; no tier advice.
    by_id = {r.id: r for r in report.recommendations}
    assert by_id["provider:fal-qwen:huggingface"].monthly_saving_micro_usd == 999 * 10_486
    assert by_id["size:fal-qwen:square"].monthly_saving_micro_usd == 999 * 15_729
    assert not any(r.kind == "tier" for r in report.recommendations)
    assert all(r.basis.spend_mode == "simulated" for r in report.recommendations)


def test_what_would_this_change_cost(factory: sessionmaker[Session]) -> None:
    with factory() as s:
        dearer = change_cost(s, "ideogram", {"params": {"rendering_speed": "QUALITY"}}, now=NOW)
        cheaper = change_cost(s, "fal-qwen", {"params": {"image_size": "square"}}, now=NOW)
        idle = change_cost(s, "huggingface", {"params": {"image_size": "square"}}, now=NOW)
        with pytest.raises(InvalidInput) as refused:
            change_cost(s, "ideogram", {"params": {"rendering_speed": "WARP"}}, now=NOW)
    # Ideogram QUALITY: $0.09 instead of $0.06, x 100 images = +$3.00 a month.
    assert (dearer.per_image_before_micro_usd, dearer.per_image_after_micro_usd) == (60_000, 90_000)
    assert dearer.monthly_change_micro_usd == 3_000_000 and dearer.images_last_30_days == 100
    # fal-qwen square_hd -> square: (5,243 - 20,972) x 200 = -3,145,800.
    assert cheaper.monthly_change_micro_usd == -3_145_800
    assert idle.monthly_change_micro_usd == 0 and idle.notes
    assert "params.rendering_speed" in refused.value.field_errors
