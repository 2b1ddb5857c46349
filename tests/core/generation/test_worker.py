"""The background worker's round: besides recovery, expiry, sweeps and probes, it fires alerts and posts their
signed webhooks (to a real receiver that checks every signature) and clears old API rate windows."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.api_rate import count_request
from core.api_tokens import create_token
from core.generation.worker import WorkerConfig, run_worker
from core.security import Actor
from core.spend import webhooks
from db.engine import transaction
from db.models import AlertEvent, ApiRateWindow, Role, User, WebhookDelivery, utcnow
from tests.core.generation.service_support import seed
from tests.core.spend.test_alerts import USD, make_budget, set_spent
from tests.core.spend.webhook_receiver import Receiver, serve

SYSTEM = Actor.system("tests")


def test_one_round_fires_alerts_delivers_them_signed_and_keeps_house(
    db_session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(webhooks.ALLOW_PRIVATE_ENV, "1")  # the receiver listens on 127.0.0.1
    monkeypatch.delenv("IMAGEGATE_EMULATOR_URL", raising=False)
    factory = db_session_factory
    seed(factory)
    budget = make_budget(factory, "team", 10 * USD)
    set_spent(factory, budget, 8 * USD, at=utcnow())  # past 50 % and 80 % this month
    with transaction(factory) as session:
        user = User(username="ann", password_hash="not-a-real-hash", role=Role.USER)
        session.add(user)
        session.flush()
        token = create_token(session, SYSTEM, user.id, "t").token.id
        count_request(session, token, 10, now=utcnow() - timedelta(hours=3))  # an old rate window
        count_request(session, token, 10)  # this minute's
    with serve(Receiver(secret="")) as receiver:
        with transaction(factory) as session:
            made = webhooks.create_webhook(session, SYSTEM, name="ops", url=receiver.url)
        assert made.secret is not None
        receiver.secret = made.secret

        report = asyncio.run(run_worker(factory, once=True, config=WorkerConfig(probes=False)))

    assert report.errors == [] and report.alerts == 2 and report.deliveries == 2
    assert {"alerts", "deliveries", "housekeeping"} <= set(report.rounds)
    assert len(receiver.posts) == 2 and all(post.signature_ok for post in receiver.posts)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(AlertEvent)) == 2
        statuses = set(session.scalars(select(WebhookDelivery.status)))
        windows = session.scalar(select(func.count()).select_from(ApiRateWindow))
    assert statuses == {"delivered"} and windows == 1
