"""Budget threshold alerts fire once per (period, threshold) when several PROCESSES see the crossing at once,
on SQLite and PostgreSQL; and each webhook gets one delivery per alert.

Two shapes per trial, alternating: every thread of every process finds the period already full and races to
fire the same three alerts; or every thread adds its share of spend (the crossings happen during the race) and
detects right after. A naive check-then-insert in the same harness fails passes with unique violations."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.spend import alerts
from core.spend.webhooks import ALLOW_PRIVATE_ENV
from db.engine import transaction
from db.models import AlertEvent, BudgetPeriod, SpendMode, Webhook, WebhookDelivery, utcnow
from tests.core.spend import alert_racers
from tests.core.spend.alert_racers import NOW
from tests.core.spend.test_alerts import make_budget
from tests.core.spend.webhook_receiver import Receiver, serve
from tests.racing import Report, backend, race_trials, thread_results

PROCESSES = 3
THREADS = 4
TRIALS = 8
LIMIT = 1_200_000
SHARE = LIMIT // (PROCESSES * THREADS)  # every writer's share: together exactly the limit
Factory = sessionmaker[Session]


def _new_period(factory: Factory, trial: int, prefilled: bool) -> int:
    budget_id = make_budget(factory, f"trial {trial}", LIMIT)
    with transaction(factory) as session:
        row = BudgetPeriod(
            budget_id=budget_id,
            mode=SpendMode.LIVE,
            period_start=NOW.replace(day=1, hour=0),
            period_end=NOW.replace(month=4, day=1, hour=0),
            spent_micro_usd=LIMIT if prefilled else 0,
            reserved_micro_usd=0,
        )
        session.add(row)
        session.flush()
        return row.id


def _race(db_url: str, factory: Factory, *, naive: bool = False, trials: int = TRIALS) -> list[dict[str, Any]]:
    shares = [0 if trial % 2 == 0 else SHARE for trial in range(trials)]

    def observe(_trial: int, period_id: int, reports: list[Report]) -> dict[str, Any]:
        with factory() as session:
            keys = Counter(
                session.scalars(
                    select(AlertEvent.dedupe_key).where(AlertEvent.dedupe_key.like(f"budget:{period_id}:%"))
                )
            )
            spent = session.scalar(select(BudgetPeriod.spent_micro_usd).where(BudgetPeriod.id == period_id))
        return {"period_id": period_id, "results": thread_results(reports), "keys": keys, "spent": spent}

    return race_trials(
        alert_racers.race,
        (db_url, trials, THREADS, tuple(shares), naive),
        processes=PROCESSES,
        trials=trials,
        set_up=lambda trial: _new_period(factory, trial, prefilled=shares[trial] == 0),
        observe=observe,
    )


def test_thresholds_fire_once_per_period_across_processes(db_url: str, db_session_factory: Factory) -> None:
    with transaction(db_session_factory) as session:
        session.add(Webhook(name="ops", url="https://hooks.example.com/x", events=[], signing_secret="s"))
    began = time.monotonic()
    facts = _race(db_url, db_session_factory)
    for trial, fact in enumerate(facts):
        where = f"[{backend(db_url)} trial {trial} {'prefilled' if trial % 2 == 0 else 'crossing'}]"
        errors = [r["error"] for r in fact["results"] if r["error"]]
        assert errors == [], f"{where} {errors}"
        created = [i for r in fact["results"] for i in r["created"]]
        pid = fact["period_id"]
        assert fact["spent"] == LIMIT, where
        assert fact["keys"] == Counter({f"budget:{pid}:50": 1, f"budget:{pid}:80": 1, f"budget:{pid}:100": 1}), where
        assert len(created) == len(set(created)) == 3, f"{where} {created}"  # each alert reported by ONE pass
    with db_session_factory() as session:
        per_event = Counter(session.scalars(select(WebhookDelivery.alert_event_id)))
        assert len(per_event) == 3 * TRIALS and set(per_event.values()) == {1}  # one delivery per alert
        assert session.scalar(select(func.count()).select_from(AlertEvent)) == 3 * TRIALS
    assert alerts.detect_alerts(db_session_factory, NOW) == 0
    seconds = time.monotonic() - began
    print(f"[{backend(db_url)}] {TRIALS} trials x {PROCESSES} processes x {THREADS} threads: {seconds:.1f} s")


def test_a_naive_check_then_insert_fails_passes_in_the_same_race(db_url: str, db_session_factory: Factory) -> None:
    facts = _race(db_url, db_session_factory, naive=True, trials=2)
    errors = [r["error"] for fact in facts for r in fact["results"] if r["error"]]
    assert errors and all("IntegrityError" in e for e in errors), errors
    for fact in facts:  # the unique index still keeps one row per key: what saves it is the database
        assert set(fact["keys"].values()) == {1}


def test_delivery_passes_in_several_processes_post_each_delivery_once(
    db_url: str, db_session_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three processes, each running three delivery passes at once, over 60 due deliveries: every delivery is
    claimed by exactly one pass (the batch claim), so the receiver sees each delivery id once."""
    monkeypatch.setenv(ALLOW_PRIVATE_ENV, "1")  # the spawned processes inherit it
    deliveries = 60
    with serve(Receiver(secret="s3cret", delay_s=0.02)) as receiver:
        now = utcnow()
        with transaction(db_session_factory) as session:
            hook = Webhook(name="ops", url=receiver.url, events=[], signing_secret="s3cret")
            session.add(hook)
            session.flush()
            session.add_all(
                WebhookDelivery(
                    webhook_id=hook.id, event_type="test", payload={"n": n}, status="pending", attempts=0,
                    created_at=now, next_attempt_at=now,
                )
                for n in range(deliveries)
            )  # fmt: skip
        [reports] = race_trials(
            alert_racers.deliver,
            (db_url, 3),
            processes=PROCESSES,
            trials=1,
            set_up=lambda _trial: None,
            observe=lambda _trial, _set_up, reports: [report["results"] for report in reports],
        )
        assert [r["error"] for r in reports] == [None] * PROCESSES, reports
        attempted = [n for r in reports for n in r["attempted"]]
        assert sum(attempted) <= deliveries and max(attempted) <= 7, attempted  # no pass takes beyond its batch
        ids = Counter(p.headers["X-Imagegate-Delivery"] for p in receiver.posts)
        assert set(ids.values()) == {1}, ids.most_common(3)  # nothing posted twice
        assert all(p.signature_ok for p in receiver.posts)
        with db_session_factory() as session:
            statuses = Counter(session.scalars(select(WebhookDelivery.status)))
            left = session.execute(
                select(WebhookDelivery.id, WebhookDelivery.last_error).where(WebhookDelivery.status != "delivered")
            ).all()
        # Disjoint batches of at most 7 from 9 passes (63 places): all 60 delivered, none twice.
        assert statuses["delivered"] == len(receiver.posts) == sum(attempted) == deliveries, (statuses, attempted, left)
        print(f"[{backend(db_url)}] {PROCESSES} processes x 3 passes: {sum(attempted)} delivered, {attempted}")
