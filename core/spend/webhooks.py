"""Webhooks: where alerts go besides the console, signed so a receiver can tell they came from us.

Administration (ADMIN only: a webhook sends what this installation knows to another machine; audited):
`create_webhook` (a signing secret from `secrets.token_urlsafe(32)`, returned ONCE; or the name of an environment
variable holding it), `list_webhooks` (never a secret), `set_active` (disable / enable), `delete_webhook` (soft:
the delivery log stays), `send_test` (a "test" delivery, posted by the next delivery pass), `list_deliveries`.
Disabling or deleting a webhook fails its pending deliveries at once, so no alert waits for a webhook that will
not be called.

Signing (what a receiver checks; `verify_signature` is the reference implementation):

    X-Imagegate-Timestamp: 1767225600                       (Unix seconds when this attempt was sent)
    X-Imagegate-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<raw body bytes>")>
    X-Imagegate-Delivery:  <delivery id>                     (the same on every retry of one delivery)
    X-Imagegate-Event:     budget_threshold | breaker_open | spend_anomaly | test

A receiver recomputes the HMAC over the timestamp header, a dot and the body exactly as received (before any
JSON parsing), compares in constant time, and rejects a timestamp more than 5 minutes from its own clock (in
either direction): a captured request replayed later fails. Within those 5 minutes it should also drop a
delivery id it has already processed. Each retry is signed afresh with its own timestamp.

URL rules (checked when a webhook is created and again before every post, with the host resolved):
http or https only; no user:password in the URL; a host is required. Link-local addresses (169.254.0.0/16 with
the cloud metadata service, fe80::/10), multicast, unspecified and reserved addresses are always refused.
Loopback and private networks are refused unless the operator sets IMAGEGATE_WEBHOOK_ALLOW_PRIVATE=1 (an
in-house chat server is a legitimate receiver, but the default must not let the console reach the machine's own
services). Redirects are not followed (a 3xx is a failed attempt). A DNS answer that changes between our check and
httpx's own lookup is not caught (no pinning): the check stops mistakes and casual misuse by an admin, not a
hostile DNS server.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from common.errors import InvalidInput, NotFound
from core import audit
from core.authz import AuthorizedActor, authorize, begin_write
from core.generation.periods import as_utc
from core.security import Actor
from core.spend.alerts import AlertKind
from db.models import AlertEvent, Role, Webhook, WebhookDelivery, utcnow

__all__ = [
    "ALLOW_PRIVATE_ENV",
    "EVENT_TYPES",
    "TEST_EVENT",
    "CreatedWebhook",
    "DeliveryView",
    "WebhookView",
    "check_address",
    "check_url",
    "create_webhook",
    "delete_webhook",
    "display_url",
    "fail_pending",
    "list_deliveries",
    "list_webhooks",
    "resolve_secret",
    "send_test",
    "set_active",
    "sign",
    "summarise_event",
    "verify_signature",
]

WEBHOOK_ADMINS: tuple[Role, ...] = (Role.ADMIN,)
TEST_EVENT = "test"
EVENT_TYPES: tuple[str, ...] = tuple(kind.value for kind in AlertKind)
"""What a webhook may subscribe to; an empty list takes every one (tests are always delivered)."""
ALLOW_PRIVATE_ENV = "IMAGEGATE_WEBHOOK_ALLOW_PRIVATE"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
MAX_URL_LENGTH = 2000
MAX_NAME_LENGTH = 100
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")


@dataclass(frozen=True)
class WebhookView:
    id: int
    name: str
    url: str
    events: tuple[str, ...]
    secret_source: str
    """"generated" (stored, shown once at creation) or "env:<VAR>"; never the secret itself."""
    active: bool
    created_at: datetime
    deleted_at: datetime | None


@dataclass(frozen=True)
class CreatedWebhook:
    webhook: WebhookView
    secret: str | None
    """The generated signing secret: shown to the admin now and never again. None with an env var."""


@dataclass(frozen=True)
class DeliveryView:
    id: int
    webhook_id: int
    alert_event_id: int | None
    event_type: str
    status: str
    attempts: int
    response_code: int | None
    response_ms: int | None
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None


# --- URL rules ------------------------------------------------------------------------------------------------


def _allow_private() -> bool:
    return os.environ.get(ALLOW_PRIVATE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """InvalidInput unless a webhook may be posted to `address` (see the module docstring)."""
    mapped = getattr(address, "ipv4_mapped", None)
    ip = mapped if mapped is not None else address
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        msg = f"webhooks may not be sent to {ip} (link-local, multicast or unspecified address)"
        raise InvalidInput(msg, {"url": msg})
    if ip.is_loopback or ip.is_private:
        if not _allow_private():
            msg = f"webhooks may not be sent to the private or loopback address {ip} unless {ALLOW_PRIVATE_ENV}=1"
            raise InvalidInput(msg, {"url": msg})
        return
    if ip.is_reserved:
        msg = f"webhooks may not be sent to the reserved address {ip}"
        raise InvalidInput(msg, {"url": msg})


def check_url(url: str) -> str:
    """The URL, stripped, if a webhook may use it; InvalidInput otherwise. Host names are resolved and checked
    again before every post (`core.spend.delivery`)."""
    text = url.strip() if isinstance(url, str) else ""
    if not text or len(text) > MAX_URL_LENGTH or any(ord(c) < 33 or ord(c) == 127 for c in text):
        msg = f"a webhook URL is 1-{MAX_URL_LENGTH} characters without spaces or control characters"
        raise InvalidInput(msg, {"url": msg})
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as error:
        raise InvalidInput(f"not a URL: {error}", {"url": str(error)}) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidInput("a webhook URL must start with http:// or https://", {"url": "http(s) only"})
    if parts.username is not None or parts.password is not None:
        msg = "a webhook URL may not carry credentials (user:password@); receivers check the signature instead"
        raise InvalidInput(msg, {"url": msg})
    host = parts.hostname
    if not host:
        raise InvalidInput("a webhook URL needs a host", {"url": "no host"})
    if port == 0:
        raise InvalidInput("a webhook URL needs a port other than 0", {"url": "port 0"})
    literal = _ip_literal(host)
    if literal is not None:
        check_address(literal)
    elif host.rstrip(".").lower() == "localhost" or host.lower().endswith(".localhost"):
        check_address(ipaddress.ip_address("127.0.0.1"))
    return text


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def display_url(url: str) -> str:
    """The URL for listings and audit rows: scheme, host and port, then only the path's length (chat services put
    the credential in the path, e.g. https://hooks.slack.com/services/T000/B000/XXXX)."""
    parts = urlsplit(url)
    rest = url[len(f"{parts.scheme}://{parts.netloc}") :]
    tail = f"/… ({len(rest)} chars)" if rest not in ("", "/") else rest
    return f"{parts.scheme}://{parts.netloc}{tail}"


# --- signing --------------------------------------------------------------------------------------------------


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """`v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`, the X-Imagegate-Signature header."""
    message = str(timestamp).encode("ascii") + b"." + body
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_signature(
    secret: str,
    timestamp: str | int,
    body: bytes,
    signature: str,
    now: datetime | None = None,
    tolerance: int = DEFAULT_TOLERANCE_S,
) -> None:
    """What a receiver does with a delivery: InvalidInput unless `signature` (the X-Imagegate-Signature header;
    several comma-separated `v1=` values are accepted, for a secret being rotated) is the HMAC of
    "<timestamp>.<body>" under `secret` AND `timestamp` (X-Imagegate-Timestamp, Unix seconds) is within
    `tolerance` seconds of `now` (a replay of an old request is refused, as is a timestamp from the future)."""
    text = str(timestamp).strip()
    if not text.isdigit() or len(text) > 12:
        raise InvalidInput("the timestamp is not Unix seconds", {"timestamp": "not Unix seconds"})
    moment = as_utc(now) if now is not None else utcnow()
    age = moment.timestamp() - int(text)
    if abs(age) > tolerance:
        which = "old" if age > 0 else "far in the future"
        msg = f"the timestamp is {abs(int(age))} s {which} (tolerance {tolerance} s): a replay or a wrong clock"
        raise InvalidInput(msg, {"timestamp": msg})
    expected = sign(secret, text, body)
    offered = [part.strip() for part in str(signature).split(",")]
    if not any(hmac.compare_digest(expected.encode(), part.encode()) for part in offered):
        raise InvalidInput("the signature does not match the body and timestamp", {"signature": "mismatch"})


def resolve_secret(secret_env_var: str | None, signing_secret: str | None) -> str:
    """The key to sign with: the environment variable's value when one is named (it wins), else the stored one."""
    if secret_env_var:
        value = os.environ.get(secret_env_var, "")
        if not value:
            raise InvalidInput(
                f"the webhook's signing secret variable {secret_env_var} is not set in this process's environment",
                {"secret_env_var": "not set"},
            )
        return value
    if not signing_secret:
        raise InvalidInput("the webhook has no signing secret", {"secret": "missing"})
    return signing_secret


# --- administration -------------------------------------------------------------------------------------------


def _admin(session: Session, actor: Actor, action: str, *, lock: bool = True) -> AuthorizedActor:
    return authorize(session, actor, *WEBHOOK_ADMINS, action=action, lock=lock)


def _view(row: Webhook) -> WebhookView:
    return WebhookView(
        id=row.id,
        name=row.name,
        url=row.url,
        events=tuple(row.events or ()),
        secret_source=f"env:{row.secret_env_var}" if row.secret_env_var else "generated",
        active=row.active,
        created_at=row.created_at,
        deleted_at=row.deleted_at,
    )


def _public(view: WebhookView) -> dict[str, Any]:
    return {
        "name": view.name,
        "url": display_url(view.url),
        "events": list(view.events),
        "secret_source": view.secret_source,
        "active": view.active,
    }


def _events(values: Iterable[str]) -> list[str]:
    cleaned: list[str] = []
    for value in values:
        event = str(value).strip().lower()
        if event not in EVENT_TYPES:
            msg = f"unknown event {value!r}; one of {', '.join(EVENT_TYPES)} (none: every event)"
            raise InvalidInput(msg, {"events": msg})
        if event not in cleaned:
            cleaned.append(event)
    return cleaned


def create_webhook(
    session: Session,
    actor: Actor,
    *,
    name: str,
    url: str,
    events: Sequence[str] = (),
    secret_env_var: str | None = None,
) -> CreatedWebhook:
    """A new, active webhook. Without `secret_env_var` a secret is generated and returned ONCE."""
    who = _admin(session, actor, "create webhooks")
    cleaned_name = name.strip() if isinstance(name, str) else ""
    if not cleaned_name or len(cleaned_name) > MAX_NAME_LENGTH:
        msg = f"a webhook needs a name of 1-{MAX_NAME_LENGTH} characters"
        raise InvalidInput(msg, {"name": msg})
    if secret_env_var is not None and not _ENV_NAME.match(secret_env_var):
        msg = "the secret's environment variable name takes letters, digits and underscores (not a secret itself)"
        raise InvalidInput(msg, {"secret_env_var": msg})
    secret = None if secret_env_var else secrets.token_urlsafe(32)
    row = Webhook(
        name=cleaned_name,
        url=check_url(url),
        events=_events(events),
        secret_env_var=secret_env_var,
        signing_secret=secret,
        active=True,
        created_by=who.user_id,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    view = _view(row)
    audit.record(session, who, "webhook.created", "webhook", str(row.id), after=_public(view))
    return CreatedWebhook(view, secret)


def list_webhooks(session: Session, actor: Actor, *, include_deleted: bool = False) -> list[WebhookView]:
    _admin(session, actor, "list webhooks", lock=False)
    query = select(Webhook).order_by(Webhook.id).execution_options(populate_existing=True)
    if not include_deleted:
        query = query.where(Webhook.deleted_at.is_(None))
    return [_view(row) for row in session.scalars(query)]


def _editable(session: Session, webhook_id: int) -> Webhook:
    row = session.scalar(
        select(Webhook).where(Webhook.id == webhook_id).with_for_update().execution_options(populate_existing=True)
    )
    if row is None or row.deleted_at is not None:
        raise NotFound(f"webhook {webhook_id} does not exist")
    return row


def fail_pending(session: Session, webhook_id: int, reason: str) -> None:
    """Close the webhook's pending deliveries as failed (it will not be called), and re-summarise their alerts.
    The alerts are locked first, in id order, as a delivery worker locks an alert before its delivery."""
    pending = session.scalars(
        select(WebhookDelivery.alert_event_id).where(
            WebhookDelivery.webhook_id == webhook_id, WebhookDelivery.status == "pending"
        )
    ).all()
    for event_id in sorted({e for e in pending if e is not None}):
        lock_event(session, int(event_id))
    closed = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook_id, WebhookDelivery.status == "pending")
        .values(status="failed", last_error=reason, next_attempt_at=None, lease_owner=None, lease_expires_at=None)
        .returning(WebhookDelivery.alert_event_id)
        .execution_options(synchronize_session=False)
    ).all()
    for event_id in sorted({row[0] for row in closed if row[0] is not None}):
        summarise_event(session, int(event_id))


def set_active(session: Session, actor: Actor, webhook_id: int, active: bool) -> WebhookView:
    """Disable (pending deliveries fail at once) or enable a webhook; a call that changes nothing is not audited."""
    who = _admin(session, actor, "disable webhooks" if not active else "enable webhooks")
    row = _editable(session, webhook_id)
    if row.active == active:
        return _view(row)
    before = _public(_view(row))
    row.active = active
    session.flush()
    if not active:
        fail_pending(session, row.id, "the webhook was disabled before this delivery succeeded")
    audit.record(
        session,
        who,
        "webhook.enabled" if active else "webhook.disabled",
        "webhook",
        str(row.id),
        before=before,
        after=_public(_view(row)),
    )
    return _view(row)


def delete_webhook(session: Session, actor: Actor, webhook_id: int) -> WebhookView:
    """Soft delete: no more deliveries (pending ones fail now); the webhook and its delivery log stay readable.
    The stored secret is erased: it can never be used again."""
    who = _admin(session, actor, "delete webhooks")
    row = _editable(session, webhook_id)
    before = _public(_view(row))
    row.deleted_at = utcnow()
    row.active = False
    row.signing_secret = None
    session.flush()
    fail_pending(session, row.id, "the webhook was deleted before this delivery succeeded")
    audit.record(session, who, "webhook.deleted", "webhook", str(row.id), before=before)
    return _view(row)


def send_test(session: Session, actor: Actor, webhook_id: int, *, now: datetime | None = None) -> int:
    """Queue a "test" delivery (posted by the next delivery pass, with retries like any other); returns its id."""
    who = _admin(session, actor, "send test webhooks")
    row = _editable(session, webhook_id)
    if not row.active:
        raise InvalidInput(f"webhook {row.name!r} is disabled; enable it first", {"webhook": "disabled"})
    moment = as_utc(now) if now is not None else utcnow()
    delivery = WebhookDelivery(
        webhook_id=row.id,
        event_type=TEST_EVENT,
        payload={
            "type": TEST_EVENT,
            "webhook": {"id": row.id, "name": row.name},
            "requested_by": who.username,
            "requested_at": moment.isoformat(),
            "message": "A test from Imagegate: if the signature checks out, this webhook works.",
        },
        status="pending",
        attempts=0,
        created_at=moment,
        next_attempt_at=moment,
    )
    session.add(delivery)
    session.flush()
    audit.record(session, who, "webhook.test_sent", "webhook", str(row.id), after={"delivery_id": delivery.id})
    return int(delivery.id)


def _delivery_view(row: WebhookDelivery) -> DeliveryView:
    return DeliveryView(
        id=row.id,
        webhook_id=row.webhook_id,
        alert_event_id=row.alert_event_id,
        event_type=row.event_type,
        status=row.status,
        attempts=row.attempts,
        response_code=row.response_code,
        response_ms=row.response_ms,
        last_error=row.last_error,
        created_at=row.created_at,
        next_attempt_at=row.next_attempt_at,
        delivered_at=row.delivered_at,
    )


def list_deliveries(
    session: Session, actor: Actor, *, webhook_id: int | None = None, limit: int = 50
) -> list[DeliveryView]:
    """The delivery log, newest first (status, attempts, last response code, latency and error)."""
    _admin(session, actor, "read the webhook delivery log", lock=False)
    query = select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(max(1, min(limit, 500)))
    if webhook_id is not None:
        query = query.where(WebhookDelivery.webhook_id == webhook_id)
    return [_delivery_view(row) for row in session.scalars(query.execution_options(populate_existing=True))]


def get_delivery(session: Session, delivery_id: int) -> DeliveryView:
    row = session.get(WebhookDelivery, delivery_id, populate_existing=True)
    if row is None:
        raise NotFound(f"webhook delivery {delivery_id} does not exist")
    return _delivery_view(row)


# --- the alert's summary --------------------------------------------------------------------------------------


def lock_event(session: Session, event_id: int) -> None:
    """Take the alert's row before changing one of its deliveries, so two workers finishing two deliveries of
    one alert summarise one after the other (SQLite: the write lock; PostgreSQL: the row, FOR UPDATE)."""
    begin_write(session)
    session.execute(select(AlertEvent.id).where(AlertEvent.id == event_id).with_for_update())


def summarise_event(session: Session, event_id: int) -> str:
    """Set the alert's delivery_status from its deliveries: pending while any is pending, else failed if any
    failed, else delivered (no_webhooks when it has none). Call with the alert locked (`lock_event`)."""
    statuses = set(session.scalars(select(WebhookDelivery.status).where(WebhookDelivery.alert_event_id == event_id)))
    if not statuses:
        summary = "no_webhooks"
    elif "pending" in statuses:
        summary = "pending"
    elif "failed" in statuses:
        summary = "failed"
    else:
        summary = "delivered"
    session.execute(
        update(AlertEvent)
        .where(AlertEvent.id == event_id)
        .values(delivery_status=summary)
        .execution_options(synchronize_session=False)
    )
    return summary
