"""Webhooks on SQLite and PostgreSQL against a real local HTTP receiver that checks every signature:
administration (ADMIN only, audited, the secret shown once), URL rules, signatures and replays, retries with
backoff until delivered or failed, leases that keep two workers from posting one delivery twice, and a small
worker loop running detection and delivery the way the worker does."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput, NotFound, PermissionDenied
from core.security import Actor
from core.spend import alerts, delivery, webhooks
from core.spend.delivery import backoff_delay, deliver_due
from core.spend.webhooks import sign, verify_signature
from db.engine import transaction
from db.models import AlertEvent, AuditLog, Role, Webhook, WebhookDelivery, utcnow
from tests.core.spend.test_alerts import USD, make_budget, make_user, set_spent
from tests.core.spend.webhook_receiver import Receiver, serve

Factory = sessionmaker[Session]
SYSTEM = Actor.system("test")


@pytest.fixture(autouse=True)
def allow_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(webhooks.ALLOW_PRIVATE_ENV, "1")  # the receiver is on 127.0.0.1


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve(Receiver(secret="")) as running:
        yield running


def create(factory: Factory, receiver: Receiver, **kwargs: object) -> int:
    with transaction(factory) as session:
        made = webhooks.create_webhook(session, SYSTEM, name="ops", url=receiver.url, **kwargs)  # type: ignore[arg-type]
    if made.secret is not None:
        receiver.secret = made.secret
    return made.webhook.id


def fire_budget_alert(factory: Factory, now: datetime) -> int:
    budget_id = make_budget(factory, "team", 10 * USD)
    set_spent(factory, budget_id, 5 * USD, at=now)
    with transaction(factory) as session:
        (event_id,) = alerts.detect_budget_alerts(session, now)
    return event_id


def delivery_row(factory: Factory) -> WebhookDelivery:
    with factory() as session:
        (row,) = session.scalars(select(WebhookDelivery)).all()
        session.expunge(row)
        return row


def event_status(factory: Factory, event_id: int) -> str:
    with factory() as session:
        row = session.get(AlertEvent, event_id)
        assert row is not None
        return row.delivery_status


# --- signatures -----------------------------------------------------------------------------------------------


def test_signature_verifies_and_refuses_tampering_replays_and_wrong_secrets() -> None:
    now = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
    ts = int(now.timestamp())
    body = b'{"type":"test"}'
    header = sign("s3cret", ts, body)
    assert header.startswith("v1=") and len(header) == 3 + 64
    verify_signature("s3cret", str(ts), body, header, now)
    verify_signature("s3cret", ts, body, header, now + timedelta(seconds=300))  # exactly 5 minutes: accepted
    verify_signature("s3cret", ts, body, f"v1=deadbeef, {header}", now)  # a rotation: any listed value
    with pytest.raises(InvalidInput, match="301 s old"):
        verify_signature("s3cret", ts, body, header, now + timedelta(seconds=301))  # a replay
    with pytest.raises(InvalidInput, match="future"):
        verify_signature("s3cret", ts + 400, body, sign("s3cret", ts + 400, body), now)
    with pytest.raises(InvalidInput, match="does not match"):
        verify_signature("s3cret", ts, body + b" ", header, now)
    with pytest.raises(InvalidInput, match="does not match"):
        verify_signature("other", ts, body, header, now)
    with pytest.raises(InvalidInput, match="does not match"):  # a new timestamp on an old signature
        verify_signature("s3cret", ts + 1, body, header, now)
    with pytest.raises(InvalidInput, match="Unix seconds"):
        verify_signature("s3cret", "12.5", body, header, now)


def test_backoff_grows_four_fold_with_jitter() -> None:
    rng = random.Random(7)
    for attempt, base in enumerate((30, 120, 480, 1920, 7680), start=1):
        for _ in range(20):
            assert base * 0.8 <= backoff_delay(attempt, rng).total_seconds() <= base * 1.2


# --- URL rules and administration -----------------------------------------------------------------------------


def test_url_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    assert webhooks.check_url(" https://hooks.example.com/x?y=1 ") == "https://hooks.example.com/x?y=1"
    for bad, reason in (
        ("ftp://example.com/x", "http:// or https://"),
        ("https://user:pw@example.com/x", "credentials"),
        ("https:///path", "host"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[fe80::1]/x", "link-local"),
        ("http://0.0.0.0:80/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("https://exa mple.com/", "spaces"),
        ("https://example.com:99999/", "URL"),
    ):
        with pytest.raises(InvalidInput, match=reason):
            webhooks.check_url(bad)
    webhooks.check_url("http://127.0.0.1:8080/x")  # allowed by the fixture's environment
    monkeypatch.delenv(webhooks.ALLOW_PRIVATE_ENV)
    for private in ("http://127.0.0.1:8080/x", "http://10.1.2.3/x", "http://localhost/x", "http://[::1]/x"):
        with pytest.raises(InvalidInput, match=webhooks.ALLOW_PRIVATE_ENV):
            webhooks.check_url(private)
    assert webhooks.display_url("https://hooks.slack.com/services/T0/B0/XXXX") == "https://hooks.slack.com/… (20 chars)"


def test_administration_is_for_active_admins_audited_and_never_shows_the_secret_again(
    db_session_factory: Factory, receiver: Receiver
) -> None:
    admin = make_user(db_session_factory, "admin", Role.ADMIN)
    hero = make_user(db_session_factory, "hero", Role.HERO)
    user = make_user(db_session_factory, "user", Role.USER)
    retired = make_user(db_session_factory, "retired", Role.ADMIN, active=False)
    for who, reason in ((hero, "ADMIN role"), (user, "ADMIN role"), (retired, "deactivated")):
        with pytest.raises(PermissionDenied, match=reason), transaction(db_session_factory) as session:
            webhooks.create_webhook(session, who, name="x", url=receiver.url)
        with pytest.raises(PermissionDenied), db_session_factory() as session:
            webhooks.list_webhooks(session, who)

    with transaction(db_session_factory) as session:
        made = webhooks.create_webhook(
            session, admin, name="ops", url=receiver.url, events=["budget_threshold", "BREAKER_OPEN"]
        )
    assert made.secret is not None and len(made.secret) >= 43
    assert made.webhook.events == ("budget_threshold", "breaker_open")
    with pytest.raises(InvalidInput, match="unknown event"), transaction(db_session_factory) as session:
        webhooks.create_webhook(session, admin, name="x", url=receiver.url, events=["budget.alert"])
    with db_session_factory() as session:
        (listed,) = webhooks.list_webhooks(session, admin)
        assert made.secret not in repr(dataclasses.asdict(listed)) and listed.secret_source == "generated"
        audit_text = repr([(a.before, a.after) for a in session.scalars(select(AuditLog))])
        assert made.secret not in audit_text and "webhook.created" in repr(
            session.scalars(select(AuditLog.action)).all()
        )

    with transaction(db_session_factory) as session:
        env = webhooks.create_webhook(session, admin, name="env", url=receiver.url, secret_env_var="OPS_HOOK_SECRET")
    assert env.secret is None and env.webhook.secret_source == "env:OPS_HOOK_SECRET"
    with pytest.raises(InvalidInput, match="environment variable name"), transaction(db_session_factory) as session:
        webhooks.create_webhook(session, admin, name="x", url=receiver.url, secret_env_var="not a name!")

    with transaction(db_session_factory) as session:
        assert not webhooks.set_active(session, admin, made.webhook.id, False).active
    with transaction(db_session_factory) as session:
        webhooks.delete_webhook(session, admin, made.webhook.id)
    with db_session_factory() as session:
        assert [w.name for w in webhooks.list_webhooks(session, admin)] == ["env"]
        assert len(webhooks.list_webhooks(session, admin, include_deleted=True)) == 2
        row = session.get(Webhook, made.webhook.id)
        assert row is not None and row.signing_secret is None and row.deleted_at is not None
        actions = session.scalars(select(AuditLog.action).order_by(AuditLog.id)).all()
        assert actions == ["webhook.created", "webhook.created", "webhook.disabled", "webhook.deleted"]
    with pytest.raises(NotFound), transaction(db_session_factory) as session:
        webhooks.send_test(session, admin, made.webhook.id)


# --- delivery against the real receiver ------------------------------------------------------------------------


async def test_retries_with_backoff_until_the_receiver_accepts(db_session_factory: Factory, receiver: Receiver) -> None:
    receiver.fail_first = 2
    create(db_session_factory, receiver)
    t0 = utcnow()
    event_id = fire_budget_alert(db_session_factory, t0)
    assert event_status(db_session_factory, event_id) == "pending"
    async with httpx.AsyncClient(trust_env=False) as client:
        assert await deliver_due(db_session_factory, client, t0) == 1
        first = delivery_row(db_session_factory)
        assert (first.status, first.attempts, first.response_code) == ("pending", 1, 500)
        assert first.last_error is not None and first.last_error.startswith("HTTP 500")
        assert first.response_ms is not None and first.lease_owner is None
        assert first.next_attempt_at is not None
        wait = (first.next_attempt_at - t0).total_seconds()
        assert 24 <= wait <= 36  # 30 s +-20 %
        assert await deliver_due(db_session_factory, client, t0 + timedelta(seconds=20)) == 0  # not due yet

        t1 = t0 + timedelta(seconds=37)
        assert await deliver_due(db_session_factory, client, t1) == 1
        second = delivery_row(db_session_factory)
        assert (second.status, second.attempts) == ("pending", 2)
        assert second.next_attempt_at is not None
        assert 96 <= (second.next_attempt_at - t1).total_seconds() <= 144  # 2 min +-20 %

        t2 = t1 + timedelta(seconds=145)
        assert await deliver_due(db_session_factory, client, t2) == 1
        assert await deliver_due(db_session_factory, client, t2 + timedelta(hours=5)) == 0  # nothing left
    done = delivery_row(db_session_factory)
    assert (done.status, done.attempts, done.response_code, done.last_error) == ("delivered", 3, 200, None)
    assert done.delivered_at == t2
    assert event_status(db_session_factory, event_id) == "delivered"

    assert [p.answered for p in receiver.posts] == [500, 500, 200]
    assert all(p.signature_ok for p in receiver.posts), [p.signature_error for p in receiver.posts]
    assert {p.headers["X-Imagegate-Delivery"] for p in receiver.posts} == {str(done.id)}
    assert {p.headers["X-Imagegate-Event"] for p in receiver.posts} == {"budget_threshold"}
    body = receiver.posts[-1].json
    assert body["type"] == "budget_threshold" and body["alert"]["id"] == event_id
    assert body["alert"]["title"].startswith("team: 50% of its monthly live limit reached")


async def test_gives_up_after_six_attempts(db_session_factory: Factory, receiver: Receiver) -> None:
    receiver.fail_first = 100
    receiver.fail_status = 503
    create(db_session_factory, receiver)
    now = utcnow()
    event_id = fire_budget_alert(db_session_factory, now)
    async with httpx.AsyncClient(trust_env=False) as client:
        for attempt in range(1, 7):
            assert await deliver_due(db_session_factory, client, now) == 1
            row = delivery_row(db_session_factory)
            assert row.attempts == attempt
            if attempt < 6:
                assert row.status == "pending" and row.next_attempt_at is not None
                now = row.next_attempt_at
        assert await deliver_due(db_session_factory, client, now + timedelta(days=1)) == 0
    row = delivery_row(db_session_factory)
    assert (row.status, row.attempts, row.response_code, row.next_attempt_at) == ("failed", 6, 503, None)
    assert event_status(db_session_factory, event_id) == "failed"
    assert len(receiver.posts) == 6


async def test_a_refused_connection_and_a_missing_secret_are_failed_attempts(
    db_session_factory: Factory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    webhook_id = create(db_session_factory, receiver, secret_env_var="OPS_HOOK_SECRET")
    monkeypatch.delenv("OPS_HOOK_SECRET", raising=False)
    now = utcnow()
    fire_budget_alert(db_session_factory, now)
    async with httpx.AsyncClient(trust_env=False) as client:
        await deliver_due(db_session_factory, client, now)
        row = delivery_row(db_session_factory)
        assert row.status == "pending" and row.last_error is not None and "OPS_HOOK_SECRET" in row.last_error
        assert receiver.posts == []  # never sent unsigned

        monkeypatch.setenv("OPS_HOOK_SECRET", "from-the-environment")
        receiver.secret = "from-the-environment"
        assert row.next_attempt_at is not None
        now = row.next_attempt_at
        await deliver_due(db_session_factory, client, now)
        assert delivery_row(db_session_factory).status == "delivered"
        assert receiver.posts[0].signature_ok

        # A receiver that is down: the connection is refused, recorded, retried.
        with transaction(db_session_factory) as session:
            test_id = webhooks.send_test(session, SYSTEM, webhook_id, now=now)
            row_hook = session.get(Webhook, webhook_id)
            assert row_hook is not None
            row_hook.url = "http://127.0.0.1:9/closed"  # discard port: nothing listens
        await deliver_due(db_session_factory, client, now)
    with db_session_factory() as session:
        failed = webhooks.get_delivery(session, test_id)
    assert failed.status == "pending" and failed.attempts == 1 and failed.response_code is None
    assert failed.last_error is not None and "ConnectError" in failed.last_error


async def test_send_test_and_the_delivery_log(db_session_factory: Factory, receiver: Receiver) -> None:
    admin = make_user(db_session_factory, "admin", Role.ADMIN)
    webhook_id = create(db_session_factory, receiver)
    with transaction(db_session_factory) as session:
        delivery_id = webhooks.send_test(session, admin, webhook_id)
    async with httpx.AsyncClient(trust_env=False) as client:
        report = await delivery.run_pass(db_session_factory, client)
    assert (report.alerts, report.attempted, report.delivered) == (0, 1, 1)
    (post,) = receiver.posts
    assert post.signature_ok and post.headers["X-Imagegate-Event"] == "test"
    assert post.json["type"] == "test" and post.json["requested_by"] == "admin"
    with db_session_factory() as session:
        (logged,) = webhooks.list_deliveries(session, admin, webhook_id=webhook_id)
    assert (logged.id, logged.status, logged.response_code, logged.attempts) == (delivery_id, "delivered", 200, 1)


async def test_disabling_a_webhook_fails_its_pending_deliveries(
    db_session_factory: Factory, receiver: Receiver
) -> None:
    webhook_id = create(db_session_factory, receiver)
    event_id = fire_budget_alert(db_session_factory, utcnow())
    with transaction(db_session_factory) as session:
        webhooks.set_active(session, SYSTEM, webhook_id, False)
    row = delivery_row(db_session_factory)
    assert row.status == "failed" and row.last_error is not None and "disabled" in row.last_error
    assert event_status(db_session_factory, event_id) == "failed"
    async with httpx.AsyncClient(trust_env=False) as client:
        assert await deliver_due(db_session_factory, client) == 0
    assert receiver.posts == []


async def test_two_workers_never_post_one_delivery_twice(db_session_factory: Factory, receiver: Receiver) -> None:
    receiver.delay_s = 0.3  # both passes are in flight at once
    create(db_session_factory, receiver)
    budget_id = make_budget(db_session_factory, "team", 10 * USD)
    set_spent(db_session_factory, budget_id, 10 * USD, at=utcnow())  # 3 alerts -> 3 deliveries
    assert alerts.detect_alerts(db_session_factory) == 3
    async with httpx.AsyncClient(trust_env=False) as one, httpx.AsyncClient(trust_env=False) as two:
        counts = await asyncio.gather(*(deliver_due(db_session_factory, c) for c in (one, two, one, two)))
    assert sum(counts) == 3
    assert sorted(p.headers["X-Imagegate-Delivery"] for p in receiver.posts) == sorted(
        {p.headers["X-Imagegate-Delivery"] for p in receiver.posts}
    )
    assert len(receiver.posts) == 3
    with db_session_factory() as session:
        assert set(session.scalars(select(WebhookDelivery.status))) == {"delivered"}
        assert set(session.scalars(select(AlertEvent.delivery_status))) == {"delivered"}


async def test_an_expired_lease_is_taken_over(db_session_factory: Factory, receiver: Receiver) -> None:
    create(db_session_factory, receiver)
    now = utcnow()
    fire_budget_alert(db_session_factory, now)
    with transaction(db_session_factory) as session:  # a worker that claimed it and died
        row = session.scalars(select(WebhookDelivery)).one()
        row.lease_owner = "dead:1:abcd"
        row.lease_expires_at = now + timedelta(seconds=30)
    async with httpx.AsyncClient(trust_env=False) as client:
        assert await deliver_due(db_session_factory, client, now) == 0  # still leased
        assert await deliver_due(db_session_factory, client, now + timedelta(seconds=31)) == 1
    assert delivery_row(db_session_factory).status == "delivered"


async def test_a_worker_loop_fires_once_and_delivers_once(db_session_factory: Factory, receiver: Receiver) -> None:
    """What the worker does each turn (detection, then delivery), run as a loop over a moving clock."""
    receiver.fail_first = 1
    create(db_session_factory, receiver)
    budget_id = make_budget(db_session_factory, "team", 10 * USD)
    start = utcnow()
    reports = []
    async with httpx.AsyncClient(trust_env=False) as client:
        for turn in range(8):
            now = start + timedelta(seconds=20 * turn)
            if turn == 2:
                set_spent(db_session_factory, budget_id, 6 * USD, at=now)
            reports.append(await delivery.run_pass(db_session_factory, client, now))
    assert [r.alerts for r in reports] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert sum(r.attempted for r in reports) == 2 and sum(r.delivered for r in reports) == 1
    assert [p.answered for p in receiver.posts] == [500, 200]
    with db_session_factory() as session:
        assert session.scalars(select(AlertEvent.delivery_status)).all() == ["delivered"]


async def test_a_slow_receiver_is_a_timed_out_attempt(
    db_session_factory: Factory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "TIMEOUT_S", 0.3)  # the bound on the whole exchange (5 s in production)
    receiver.delay_s = 1.0
    create(db_session_factory, receiver)
    now = utcnow()
    fire_budget_alert(db_session_factory, now)
    async with httpx.AsyncClient(trust_env=False) as client:
        began = asyncio.get_running_loop().time()
        assert await deliver_due(db_session_factory, client, now) == 1
        took = asyncio.get_running_loop().time() - began
    row = delivery_row(db_session_factory)
    assert row.status == "pending" and row.attempts == 1 and row.response_code is None
    assert row.last_error is not None and row.last_error.startswith("timeout after 0.3 s")
    assert row.response_ms is not None and 250 <= row.response_ms < 900 and took < 0.9


async def test_a_delivery_queued_for_a_webhook_disabled_meanwhile_is_failed_not_left_pending(
    db_session_factory: Factory, receiver: Receiver
) -> None:
    webhook_id = create(db_session_factory, receiver)
    event_id = fire_budget_alert(db_session_factory, utcnow())
    with transaction(db_session_factory) as session:  # disabled behind the alert's back (raced with its fan-out)
        row = session.get(Webhook, webhook_id)
        assert row is not None
        row.active = False
    async with httpx.AsyncClient(trust_env=False) as client:
        assert await deliver_due(db_session_factory, client) == 0
    failed = delivery_row(db_session_factory)
    assert failed.status == "failed" and failed.last_error is not None and "disabled or deleted" in failed.last_error
    assert event_status(db_session_factory, event_id) == "failed" and receiver.posts == []
