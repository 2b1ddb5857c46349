"""Webhook delivery: run by the worker, never on a generation's path, so a slow receiver delays nobody.

One `webhook_deliveries` row per alert per webhook (made when the alert fires) or per "send test". A pass
(`deliver_due`) CLAIMS a batch of due rows with one guarded statement that re-checks every condition,

    UPDATE webhook_deliveries SET lease_owner = :me, lease_expires_at = :now + 60 s
    WHERE id IN (<a batch of due ids>) AND status = 'pending' AND next_attempt_at <= :now
      AND (lease_expires_at IS NULL OR lease_expires_at < :now) AND <its webhook is active>

(the batch: PostgreSQL reads it first FOR UPDATE SKIP LOCKED; SQLite selects it inside the statement),

committed before anything is posted: however many workers run, one of them holds a delivery at a time, and a
worker that dies mid-post leaves a lease that runs out (the delivery is then posted again: receivers dedupe on
X-Imagegate-Delivery). The POST (httpx, 5 s timeout, no redirects) is signed at the moment of sending
(core.spend.webhooks). A 2xx is delivered; anything else (status, timeout, refused connection, a URL that no
longer passes the rules, a missing secret) is retried after 30 s, 2 min, 8 min, 32 min, 128 min (x4 each, with
+-20 % jitter so a receiver coming back is not hit by every retry at once); the 6th failed attempt is final
(`failed`). Every attempt records the response code, the error and the latency. The result is written only by
the lease holder (`WHERE lease_owner = :me`), with the alert's row locked first, so the alert's
`delivery_status` summary is right when several workers finish deliveries of one alert at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from common.errors import ImagegateError
from core.generation.dbexec import run_db
from core.generation.periods import as_utc
from core.spend.alerts import AnomalyConfig, detect_alerts
from core.spend.webhooks import (
    check_address,
    check_url,
    fail_pending,
    lock_event,
    resolve_secret,
    sign,
    summarise_event,
)
from db.engine import transaction
from db.models import Webhook, WebhookDelivery, utcnow

__all__ = [
    "LEASE",
    "MAX_ATTEMPTS",
    "TIMEOUT_S",
    "PassReport",
    "backoff_delay",
    "body_bytes",
    "deliver_due",
    "run_pass",
]

MAX_ATTEMPTS = 6
FIRST_DELAY = timedelta(seconds=30)
BACKOFF_FACTOR = 4
JITTER = 0.2
TIMEOUT_S = 5.0
LEASE = timedelta(seconds=60)
"""Far above the 5 s timeout: a lease runs out only when its worker died."""
BATCH = 50
CONCURRENCY = 8
"""Posts in flight at once per pass: one slow receiver does not hold the others up."""
MAX_ERROR_CHARS = 500
MAX_ANSWER_BYTES = 1024

D = WebhookDelivery


def backoff_delay(attempts_made: int, rng: random.Random | None = None) -> timedelta:
    """The wait after the `attempts_made`-th failed attempt: 30 s x 4^(n-1), +-20 % jitter."""
    base = FIRST_DELAY * (BACKOFF_FACTOR ** max(0, attempts_made - 1))
    spread = (rng or random).uniform(1 - JITTER, 1 + JITTER)
    return timedelta(seconds=round(base.total_seconds() * spread, 3))


def body_bytes(payload: dict[str, Any]) -> bytes:
    """The exact bytes posted (and signed): compact JSON, keys sorted, UTF-8."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class _Claimed:
    id: int
    webhook_id: int
    alert_event_id: int | None
    event_type: str
    payload: dict[str, Any]
    attempts: int
    url: str
    secret_env_var: str | None
    signing_secret: str | None


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    code: int | None
    error: str | None
    ms: int | None


@dataclass
class PassReport:
    alerts: int = 0
    """Alerts this pass created."""
    attempted: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def _claimable(now: datetime) -> tuple[Any, ...]:
    """What makes a delivery claimable at `now`: pending, due, not leased (or its lease ran out), its webhook on."""
    return (
        D.status == "pending",
        or_(D.next_attempt_at.is_(None), D.next_attempt_at <= now),
        or_(D.lease_expires_at.is_(None), D.lease_expires_at < now),
        D.webhook_id.in_(select(Webhook.id).where(Webhook.active.is_(True), Webhook.deleted_at.is_(None))),
    )


def _claim(session: Session, owner: str, now: datetime, limit: int) -> list[_Claimed]:
    """Lease up to `limit` due deliveries to `owner`; concurrent workers take disjoint batches.

    PostgreSQL: the batch is read FOR UPDATE SKIP LOCKED (locked rows are someone else's batch: skipped, never
    waited for), then leased. Two statements on purpose: inside `UPDATE ... WHERE id IN (SELECT ... LIMIT n FOR
    UPDATE SKIP LOCKED)` PostgreSQL may run the subquery more than once and lease more than n.
    SQLite: one statement, `UPDATE ... WHERE id IN (SELECT ... LIMIT n)`, which runs under the database's write
    lock, so the next worker's statement already sees these leases.
    Either way the UPDATE re-checks every condition on each row as it is when updated: a row never has two
    lease holders."""
    batch = select(D.id).where(*_claimable(now)).order_by(D.next_attempt_at, D.id).limit(limit)
    chosen: Any
    if session.get_bind().dialect.name == "postgresql":
        chosen = session.scalars(batch.with_for_update(skip_locked=True)).all()
        if not chosen:
            return []
    else:
        chosen = batch.scalar_subquery()
    taken = session.scalars(
        update(D)
        .where(D.id.in_(chosen), *_claimable(now))
        .values(lease_owner=owner, lease_expires_at=now + LEASE)
        .returning(D.id)
        .execution_options(synchronize_session=False)
    ).all()
    if not taken:
        return []
    rows = session.execute(
        select(D, Webhook).join(Webhook, Webhook.id == D.webhook_id).where(D.id.in_(taken)).order_by(D.id)
    ).all()
    return [
        _Claimed(
            id=delivery.id,
            webhook_id=webhook.id,
            alert_event_id=delivery.alert_event_id,
            event_type=delivery.event_type,
            payload=dict(delivery.payload),
            attempts=delivery.attempts,
            url=webhook.url,
            secret_env_var=webhook.secret_env_var,
            signing_secret=webhook.signing_secret,
        )
        for delivery, webhook in rows
    ]


def _close_orphans(factory: sessionmaker[Session]) -> None:
    """Fail pending deliveries of webhooks that are disabled or deleted. Disabling fails them itself; this
    catches an alert that fired while the webhook was being disabled (it saw the webhook still active)."""
    with factory() as session:
        stopped = session.scalars(
            select(D.webhook_id)
            .join(Webhook, Webhook.id == D.webhook_id)
            .where(D.status == "pending", or_(Webhook.active.is_(False), Webhook.deleted_at.is_not(None)))
            .distinct()
        ).all()
    for webhook_id in stopped:
        with transaction(factory) as session:
            fail_pending(session, int(webhook_id), "the webhook was disabled or deleted before this delivery")


def _claim_due(factory: sessionmaker[Session], owner: str, now: datetime, limit: int) -> list[_Claimed]:
    _close_orphans(factory)
    with transaction(factory) as session:  # committed before any post: the leases are visible to others at once
        return _claim(session, owner, now, limit)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


async def _check_resolved(url: str) -> None:
    """The URL rules again, on every address the host resolves to now."""
    check_url(url)
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for info in infos:
        check_address(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))


async def _post(client: httpx.AsyncClient, claimed: _Claimed) -> _Outcome:
    started = time.perf_counter()

    def elapsed() -> int:
        return int((time.perf_counter() - started) * 1000)

    try:
        await _check_resolved(claimed.url)
        secret = resolve_secret(claimed.secret_env_var, claimed.signing_secret)
    except ImagegateError as error:
        return _Outcome(False, None, _clip(f"not sent: {error}"), None)
    except OSError as error:
        return _Outcome(False, None, _clip(f"not sent: cannot resolve the host: {error}"), None)
    body = body_bytes(claimed.payload)
    timestamp = int(time.time())  # the sending moment, whatever `now` the pass was scheduled with
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Imagegate-Webhooks/1",
        "X-Imagegate-Timestamp": str(timestamp),
        "X-Imagegate-Signature": sign(secret, timestamp, body),
        "X-Imagegate-Delivery": str(claimed.id),
        "X-Imagegate-Event": claimed.event_type,
    }
    started = time.perf_counter()
    try:
        # One bound on the whole exchange (httpx's timeout is per phase), and at most 1 KiB of the answer read.
        async with asyncio.timeout(TIMEOUT_S):
            async with client.stream(
                "POST", claimed.url, content=body, headers=headers, timeout=TIMEOUT_S, follow_redirects=False
            ) as response:
                head = b""
                async for chunk in response.aiter_bytes():
                    head += chunk
                    if len(head) >= MAX_ANSWER_BYTES:
                        break
    except (TimeoutError, httpx.TimeoutException) as error:
        return _Outcome(False, None, _clip(f"timeout after {TIMEOUT_S:g} s ({type(error).__name__})"), elapsed())
    except httpx.HTTPError as error:
        return _Outcome(False, None, _clip(f"{type(error).__name__}: {error}"), elapsed())
    ms = elapsed()
    if 200 <= response.status_code < 300:
        return _Outcome(True, response.status_code, None, ms)
    snippet = head[:200].decode("utf-8", "replace").strip()
    error_text = f"HTTP {response.status_code}" + (f": {snippet}" if snippet else "")
    return _Outcome(False, response.status_code, _clip(error_text), ms)


def _finish(
    session: Session, claimed: _Claimed, owner: str, outcome: _Outcome, now: datetime, rng: random.Random | None
) -> str | None:
    """Record one attempt (lease holder only); returns the delivery's new status, or None if the lease was lost."""
    if claimed.alert_event_id is not None:
        lock_event(session, claimed.alert_event_id)
    attempts = claimed.attempts + 1
    values: dict[str, Any] = {
        "attempts": attempts,
        "response_code": outcome.code,
        "response_ms": outcome.ms,
        "last_error": outcome.error,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if outcome.ok:
        values.update(status="delivered", delivered_at=now, next_attempt_at=None)
    elif attempts >= MAX_ATTEMPTS:
        values.update(status="failed", next_attempt_at=None)
    else:
        values.update(status="pending", next_attempt_at=now + backoff_delay(attempts, rng))
    done = session.execute(
        update(D)
        .where(D.id == claimed.id, D.lease_owner == owner)
        .values(**values)
        .returning(D.id)
        .execution_options(synchronize_session=False)
    ).first()
    if done is None:
        return None
    if claimed.alert_event_id is not None:
        summarise_event(session, claimed.alert_event_id)
    return str(values["status"])


def _owner() -> str:
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{secrets.token_hex(4)}"


async def deliver_due(
    session_factory: sessionmaker[Session],
    http_client: httpx.AsyncClient,
    now: datetime | None = None,
    *,
    limit: int = BATCH,
    rng: random.Random | None = None,
    report: PassReport | None = None,
) -> int:
    """One delivery pass (what the worker runs): claim what is due at `now` (default: the clock), post each
    (up to CONCURRENCY at once), record the outcome. Returns how many deliveries this pass attempted."""
    moment = as_utc(now) if now is not None else utcnow()
    owner = _owner()
    claimed = await run_db(_claim_due, session_factory, owner, moment, limit)
    gate = asyncio.Semaphore(CONCURRENCY)
    tally = report if report is not None else PassReport()

    async def one(item: _Claimed) -> None:
        async with gate:
            outcome = await _post(http_client, item)

        def record() -> str | None:
            with transaction(session_factory) as session:
                return _finish(session, item, owner, outcome, moment if now is not None else utcnow(), rng)

        status = await run_db(record)
        tally.attempted += 1
        if status == "delivered":
            tally.delivered += 1
        elif status == "pending":
            tally.retrying += 1
        elif status == "failed":
            tally.failed += 1
        if outcome.error:
            tally.errors.append(f"delivery {item.id}: {outcome.error}")

    await asyncio.gather(*(one(item) for item in claimed))
    return len(claimed)


async def run_pass(
    session_factory: sessionmaker[Session],
    http_client: httpx.AsyncClient | None = None,
    now: datetime | None = None,
    *,
    anomaly: AnomalyConfig | None = None,
    detect: bool = True,
) -> PassReport:
    """One detection pass (unless `detect` is false) and one delivery pass: `imagegate alerts run`, and what the
    worker does each turn."""
    report = PassReport()
    if detect:
        report.alerts = await run_db(detect_alerts, session_factory, now, anomaly=anomaly)
    if http_client is not None:
        await deliver_due(session_factory, http_client, now, report=report)
        return report
    async with httpx.AsyncClient(trust_env=False) as client:
        await deliver_due(session_factory, client, now, report=report)
    return report
