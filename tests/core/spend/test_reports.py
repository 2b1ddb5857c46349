"""Spend reports on seeded rollups, on SQLite and PostgreSQL, with figures worked out by hand from the seed."""

from __future__ import annotations

from datetime import date

import pytest
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput
from core import settings_service
from core.security import Actor
from core.seed import seed_defaults
from core.spend.reports import build_report, cost_per_image_micros, report_csv_rows
from db.engine import transaction
from tests.core.spend.rollup_seed import add_rollup, add_user

OCTOBER = (date(2026, 10, 1), date(2026, 10, 31))
Seeded = tuple[sessionmaker[Session], int, int]


@pytest.fixture
def seeded(db_session_factory: sessionmaker[Session]) -> Seeded:
    """October and November 2026 on the rollups:

    - 10-01 fal-qwen live, alice: 10 succeeded, 10 images, $0.150000, all 10 at 1,200-1,400 ms (bucket 1150-1500)
    - 10-01 fal-qwen live, alice: 2 failed (timeout), 1 with billing unknown, estimated $0.030000, no latency
    - 10-02 ideogram live, bob: 4 succeeded, 4 images, $0.240000, all at 2,000 ms (bucket 1950-2500)
    - 10-02 fal-qwen sandbox, no user: 5 succeeded, 5 images, $0.050000 simulated
    - 11-01 fal-qwen live, alice: 2 succeeded, 2 images, $0.030000
    """
    factory = db_session_factory
    seed_defaults(factory)
    with transaction(factory) as s:
        alice, bob = add_user(s, "alice"), add_user(s, "bob")
        add_rollup(s, date(2026, 10, 1), "fal-qwen", user_id=alice, attempts=10, images=10,
                   actual_micro_usd=150_000, latencies={1200: 5, 1400: 5})  # fmt: skip
        add_rollup(s, date(2026, 10, 1), "fal-qwen", user_id=alice, status="failed", error_class="timeout",
                   attempts=2, unknown_billing=1, estimated_micro_usd=30_000)  # fmt: skip
        add_rollup(s, date(2026, 10, 2), "ideogram", user_id=bob, attempts=4, images=4,
                   actual_micro_usd=240_000, latencies={2000: 4})  # fmt: skip
        add_rollup(s, date(2026, 10, 2), "fal-qwen", mode="sandbox", attempts=5, images=5,
                   actual_micro_usd=50_000, latencies={100: 5})  # fmt: skip
        add_rollup(s, date(2026, 11, 1), "fal-qwen", user_id=alice, attempts=2, images=2,
                   actual_micro_usd=30_000, latencies={1200: 2})  # fmt: skip
    return factory, alice, bob


def test_by_provider_with_cost_per_image_latency_success_and_errors(seeded: Seeded) -> None:
    factory, _, _ = seeded
    with factory() as s:
        report = build_report(s, date_from=OCTOBER[0], date_to=OCTOBER[1], by="provider")
    assert report.target_cost_per_image_micro_usd == 20_000  # the default $0.02
    rows = {(r.spend_mode, r.key): r for r in report.rows}
    assert set(rows) == {("live", "fal-qwen"), ("live", "ideogram"), ("simulated", "fal-qwen")}
    fal = rows[("live", "fal-qwen")]
    # 12 attempts (10 + 2 failed), 10 images, $0.15 actual -> $0.015 per image, under the $0.02 target.
    assert (fal.attempts, fal.succeeded, fal.images, fal.actual_micro_usd) == (12, 10, 10, 150_000)
    assert fal.estimated_micro_usd == 180_000 and fal.unknown_billing == 1
    assert fal.cost_per_image_micro_usd == 15_000 and fal.over_target is False
    assert fal.success_rate == pytest.approx(10 / 12)
    # 10 timed attempts, all in the (1150, 1500] bucket: p50 = 1150 + 350 x 5/10, p95 = 1150 + 350 x 9.5/10.
    assert fal.p50_ms == pytest.approx(1325.0) and fal.p95_ms == pytest.approx(1482.5)
    ideogram = rows[("live", "ideogram")]
    assert ideogram.cost_per_image_micro_usd == 60_000 and ideogram.over_target is True
    # (1950, 2500] bucket, 4 attempts: p50 = 1950 + 550 x 2/4 = 2225.
    assert ideogram.p50_ms == pytest.approx(2225.0)
    sandbox = rows[("simulated", "fal-qwen")]
    assert sandbox.actual_micro_usd == 50_000 and sandbox.cost_per_image_micro_usd == 10_000

    totals = {t.spend_mode: t for t in report.totals}
    # Live: $0.15 + $0.24 = $0.39 over 14 images = $0.027857142... -> 27,857 micro-USD. Simulated apart: $0.05.
    assert totals["live"].actual_micro_usd == 390_000 and totals["live"].images == 14
    assert totals["live"].cost_per_image_micro_usd == 27_857 and totals["live"].over_target is True
    assert totals["simulated"].actual_micro_usd == 50_000

    perf = {(p.spend_mode, p.provider): p for p in report.providers}
    assert perf[("live", "fal-qwen")].success_rate == pytest.approx(10 / 12)
    assert perf[("live", "ideogram")].success_rate == 1.0
    errors = [(e.spend_mode, e.provider, e.error_class, e.attempts, e.share_of_failures) for e in report.error_classes]
    assert errors == [("live", "fal-qwen", "timeout", 2, 1.0)]


def test_by_day_month_user_mode(seeded: Seeded) -> None:
    factory, alice, bob = seeded
    with factory() as s:
        by_month = build_report(s, date_from=date(2026, 10, 1), date_to=date(2026, 11, 30), by="month", mode="live")
        by_day = build_report(s, date_from=OCTOBER[0], date_to=OCTOBER[1], by="day")
        by_user = build_report(s, date_from=OCTOBER[0], date_to=OCTOBER[1], by="user")
        by_mode = build_report(s, date_from=OCTOBER[0], date_to=OCTOBER[1], by="mode")
    assert [(r.key, r.actual_micro_usd, r.images) for r in by_month.rows] == [
        ("2026-10", 390_000, 14),
        ("2026-11", 30_000, 2),
    ]
    assert all(r.spend_mode == "live" for r in by_month.rows)
    # The month row folds the days' histograms: 10 fal at 1,150-1,500 ms and 4 Ideogram at 1,950-2,500 ms;
    # p50 is rank 7 of 14, inside the first bucket: 1150 + 350 x 7/10 = 1395.
    assert by_month.rows[0].p50_ms == pytest.approx(1395.0)
    assert [(r.spend_mode, r.key, r.actual_micro_usd) for r in by_day.rows] == [
        ("live", "2026-10-01", 150_000),
        ("live", "2026-10-02", 240_000),
        ("simulated", "2026-10-02", 50_000),
    ]
    assert [(r.spend_mode, r.label, r.actual_micro_usd) for r in by_user.rows] == [
        ("live", "alice", 150_000),
        ("live", "bob", 240_000),
        ("simulated", "system/CLI", 50_000),
    ]
    assert {r.key for r in by_user.rows} == {str(alice), str(bob), "0"}
    assert [(r.spend_mode, r.key) for r in by_mode.rows] == [("live", "live"), ("simulated", "sandbox")]


def test_target_is_a_global_setting_through_the_money_gate(seeded: Seeded) -> None:
    factory, _, _ = seeded
    with transaction(factory) as s:
        settings_service.save_global_settings(s, Actor.system("test"), {"target_cost_per_image_usd": "0.1"})
    with factory() as s:
        report = build_report(s, date_from=OCTOBER[0], date_to=OCTOBER[1], by="provider", mode="live")
    assert report.target_cost_per_image_micro_usd == 100_000
    assert all(r.over_target is False for r in report.rows)
    for bad in ("1e-2", "0.0000001", "-1", "0", 0.1):
        with transaction(factory) as s, pytest.raises(InvalidInput) as refused:
            settings_service.save_global_settings(s, Actor.system("test"), {"target_cost_per_image_usd": bad})
        assert "target_cost_per_image_usd" in refused.value.field_errors


def test_refusals_and_csv(seeded: Seeded) -> None:
    factory, _, _ = seeded
    with factory() as s:
        by_preset = build_report(s, date_from=OCTOBER[0], date_to=OCTOBER[1], by="preset")
        assert {row.key for row in by_preset.rows} == {""}  # seeded rollups record no preset
        with pytest.raises(InvalidInput):
            build_report(s, date_from=OCTOBER[1], date_to=OCTOBER[0])
        with pytest.raises(InvalidInput):
            build_report(s, date_from=OCTOBER[0], date_to=OCTOBER[1], by="colour")
        with pytest.raises(InvalidInput):
            build_report(s, date_from=OCTOBER[0], date_to=OCTOBER[1], mode="both")
        empty = build_report(s, date_from=date(2020, 1, 1), date_to=date(2020, 1, 31))
        report = build_report(s, date_from=OCTOBER[0], date_to=OCTOBER[1], by="provider")
    assert empty.rows == [] and empty.totals == []
    records = report_csv_rows(report)
    assert len(records) == len(report.rows) + len(report.totals)
    assert len({tuple(r) for r in records}) == 1  # the same columns on every row


def test_cost_per_image_rounds_half_up_once() -> None:
    assert cost_per_image_micros(10, 4) == 3  # 2.5 -> 3
    assert cost_per_image_micros(390_000, 14) == 27_857
    assert cost_per_image_micros(5, 0) is None


def test_the_target_stays_out_of_the_stored_form_at_its_default() -> None:
    from core.settings import GlobalSettings
    from core.settings_service import settings_json

    stored = settings_json(GlobalSettings())
    assert "target_cost_per_image_usd" not in stored and "user_preference_fields" not in stored
    assert settings_json(GlobalSettings(target_cost_per_image_usd="0.0500"))["target_cost_per_image_usd"] == "0.05"
