"""The admin endpoints (ADMIN and HERO; some ADMIN only, as core decides): provider settings with versions and
audit, the usage ledger, cost reports, budgets with forecasts, alerts, webhooks, recommendations and provider
health. Each route is one call into core, which authorizes it from the database."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from sqlalchemy.orm import Session, sessionmaker

from api.deps import acting_account, sessions
from api.routes_generate import ERRORS, PROBLEM
from common.errors import Conflict
from core import settings_service
from core.authz import authorize
from core.generation import budgets
from core.generation.dbexec import in_transaction, run_db
from core.provider_status import provider_statuses
from core.security import Actor, Role
from core.spend import alerts, forecast, optimizer, reports, webhooks
from core.usage_log import MAX_PAGE, AttemptsPage, list_attempts

router = APIRouter(prefix="/api/admin", tags=["admin"], responses={**ERRORS, 404: PROBLEM, 409: PROBLEM})
T = TypeVar("T")
Who = Annotated[Actor, Depends(acting_account)]
Sessions = Annotated[sessionmaker[Session], Depends(sessions)]
STAFF = (Role.ADMIN, Role.HERO)
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]
ProviderId = Annotated[str, Path(min_length=1, max_length=64)]
_JSON: TypeAdapter[Any] = TypeAdapter(Any)


def _json(value: Any) -> Any:
    """Core's views as JSON: dataclasses and models field by field, Decimals as exact strings, times in ISO."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return _JSON.dump_python(value, mode="json")


def _object(value: Any) -> dict[str, Any]:
    out = _json(value)
    assert isinstance(out, dict)
    return out


def _staff(session: Session, actor: Actor, action: str) -> None:
    authorize(session, actor, *STAFF, action=action, lock=False)


async def _read(factory: sessionmaker[Session], fn: Callable[[Session], T]) -> T:
    def run() -> T:
        with factory() as session:
            return fn(session)

    return await run_db(run)


async def _write(factory: sessionmaker[Session], fn: Callable[[Session], T]) -> T:
    return await in_transaction(factory, fn)


# --- provider settings ------------------------------------------------------------------------------------------


class SettingsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(description="The whole settings object; missing fields take their defaults.")
    comment: str | None = Field(default=None, max_length=500)
    expected_version: int | None = Field(default=None, ge=1, description="Refused (409) if another save came first.")


class NewSettingsBody(SettingsBody):
    provider: str = Field(max_length=64)


def _settings_out(view: settings_service.ProviderSettingsView) -> dict[str, Any]:
    return {
        "provider": view.provider,
        "version": view.version,
        "settings": settings_service.settings_json(view.settings),
        "updated_at": view.updated_at.isoformat(),
        "updated_by": view.updated_by,
        "comment": view.comment,
    }


@router.get("/provider-settings")
async def list_provider_settings(actor: Who, factory: Sessions) -> list[dict[str, Any]]:
    def read(session: Session) -> list[dict[str, Any]]:
        _staff(session, actor, "read provider settings")
        return [_settings_out(v) for v in settings_service.list_provider_settings(session)]

    return await _read(factory, read)


@router.get("/provider-settings/{provider}")
async def get_provider_settings(provider: ProviderId, actor: Who, factory: Sessions) -> dict[str, Any]:
    def read(session: Session) -> dict[str, Any]:
        _staff(session, actor, "read provider settings")
        return _settings_out(settings_service.get_provider_settings(session, provider))

    return await _read(factory, read)


@router.get("/provider-settings/{provider}/versions")
async def provider_settings_versions(provider: ProviderId, actor: Who, factory: Sessions) -> list[dict[str, Any]]:
    def read(session: Session) -> list[dict[str, Any]]:
        _staff(session, actor, "read provider settings")
        return [_json(v) for v in settings_service.provider_history(session, provider)]

    return await _read(factory, read)


@router.post("/provider-settings", status_code=201)
async def create_provider_settings(body: NewSettingsBody, actor: Who, factory: Sessions) -> dict[str, Any]:
    """Configure a provider that has no settings yet (409 if it has: use PUT)."""

    def write(session: Session) -> dict[str, Any]:
        if settings_service.is_configured(session, body.provider):
            raise Conflict(f"{body.provider} is already configured; change it with PUT")
        saved = settings_service.save_provider_settings(
            session, actor, body.provider, body.settings, comment=body.comment
        )
        return _object(saved)

    return await _write(factory, write)


@router.put("/provider-settings/{provider}")
async def replace_provider_settings(
    provider: ProviderId, body: SettingsBody, actor: Who, factory: Sessions
) -> dict[str, Any]:
    """Save a new version of a provider's settings (validated as in the console; the change is audited)."""

    def write(session: Session) -> dict[str, Any]:
        saved = settings_service.save_provider_settings(
            session, actor, provider, body.settings, comment=body.comment, expected_version=body.expected_version
        )
        return _object(saved)

    return await _write(factory, write)


@router.delete("/provider-settings/{provider}")
async def delete_provider_settings(
    provider: ProviderId, actor: Who, factory: Sessions, comment: Annotated[str | None, Query(max_length=500)] = None
) -> dict[str, Any]:
    """Remove a provider's configuration (its history stays; a rollback restores it)."""

    def write(session: Session) -> dict[str, Any]:
        return _object(settings_service.delete_provider_settings(session, actor, provider, comment=comment))

    return await _write(factory, write)


# --- usage and costs ----------------------------------------------------------------------------------------------


@router.get("/provider-usage", response_model=AttemptsPage)
async def provider_usage(
    actor: Who,
    factory: Sessions,
    provider: Annotated[str | None, Query(max_length=64)] = None,
    user_id: Annotated[int | None, Query(ge=0, le=2**31)] = None,
    mode: Annotated[str | None, Query(max_length=16)] = None,
    status: Annotated[str | None, Query(max_length=16)] = None,
    date_from: Annotated[date | None, Query(alias="from")] = None,
    date_to: Annotated[date | None, Query(alias="to")] = None,
    before_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> AttemptsPage:
    """Provider attempts, newest first; page with `before_id` (the previous page's `next_before_id`)."""
    return await _read(
        factory,
        functools.partial(
            list_attempts,
            actor=actor,
            provider=provider,
            user_id=user_id,
            mode=mode,
            status=status,
            date_from=date_from,
            date_to=date_to,
            before_id=before_id,
            limit=limit,
        ),
    )


def _default_range(date_from: date | None, date_to: date | None) -> tuple[date, date]:
    last = date_to or datetime.now(UTC).date()
    return (date_from or last - timedelta(days=29)), last


@router.get("/provider-costs", response_model=reports.SpendReport)
async def provider_costs(
    actor: Who,
    factory: Sessions,
    date_from: Annotated[date | None, Query(alias="from")] = None,
    date_to: Annotated[date | None, Query(alias="to")] = None,
    by: Annotated[str, Query(max_length=16, description="day | month | provider | user | mode")] = "day",
    mode: Annotated[str | None, Query(max_length=16, description="live | simulated (default: both, apart)")] = None,
) -> reports.SpendReport:
    """Spend per day or month, per provider or user (from the rollups), cost per image against the target,
    latency and success per provider, error classes. Default range: the last 30 days."""
    first, last = _default_range(date_from, date_to)

    def read(session: Session) -> reports.SpendReport:
        _staff(session, actor, "read cost reports")
        return reports.build_report(session, date_from=first, date_to=last, by=by, mode=mode)

    return await _read(factory, read)


# --- budgets --------------------------------------------------------------------------------------------------------


class BudgetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=100)
    scope: str = Field(max_length=16, description="global | provider | user")
    scope_id: str | None = Field(default=None, max_length=64)
    period: str = Field(max_length=16, description="daily | monthly")
    limit_micro_usd: int = Field(ge=0, le=10**13)
    hard: bool = True
    degrade_action: str | None = Field(default=None, max_length=32)


class BudgetChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=100)
    limit_micro_usd: int | None = Field(default=None, ge=0, le=10**13)
    hard: bool | None = None
    active: bool | None = None
    comment: str | None = Field(default=None, max_length=500)


class ThresholdsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thresholds: list[int] = Field(max_length=20, description="Percent of the limit, e.g. [50, 80, 100].")


def _budget_out(session: Session, view: budgets.BudgetView) -> dict[str, Any]:
    out = _object(view)
    out["periods"] = {
        mode.value: _json(budgets.current_figures(session, view.id, mode))
        for mode in (budgets.SpendMode.LIVE, budgets.SpendMode.SIMULATED)
    }
    out["forecast"] = _json(forecast.forecast_budget(session, view.id)) if view.active else None
    out["thresholds"] = list(alerts.thresholds(session, view.id)[0])
    return out


@router.get("/budgets")
async def list_budgets(actor: Who, factory: Sessions) -> list[dict[str, Any]]:
    """Every budget with this period's figures (live and simulated apart), its forecast and thresholds."""

    def read(session: Session) -> list[dict[str, Any]]:
        _staff(session, actor, "read budgets")
        return [_budget_out(session, view) for view in budgets.list_budgets(session)]

    return await _read(factory, read)


@router.post("/budgets", status_code=201)
async def create_budget(body: BudgetBody, actor: Who, factory: Sessions) -> dict[str, Any]:
    def write(session: Session) -> dict[str, Any]:
        view = budgets.create_budget(session, actor, **body.model_dump())
        return _budget_out(session, view)

    return await _write(factory, write)


@router.put("/budgets/{budget_id}")
async def change_budget(budget_id: RowId, body: BudgetChange, actor: Who, factory: Sessions) -> dict[str, Any]:
    def write(session: Session) -> dict[str, Any]:
        view = budgets.update_budget(session, actor, budget_id, **body.model_dump(exclude_none=True))
        return _budget_out(session, view)

    return await _write(factory, write)


@router.delete("/budgets/{budget_id}")
async def delete_budget(budget_id: RowId, actor: Who, factory: Sessions) -> dict[str, Any]:
    """Soft delete: the budget stops applying; its periods and the ledger stay."""
    return await _write(factory, lambda session: _json(budgets.delete_budget(session, actor, budget_id)))


@router.post("/budgets/{budget_id}/reset")
async def reset_budget_period(
    budget_id: RowId,
    actor: Who,
    factory: Sessions,
    mode: budgets.SpendMode = budgets.SpendMode.LIVE,
) -> dict[str, Any]:
    """Start the current period afresh; the closed period keeps its figures in the history."""
    return await _write(factory, lambda session: _json(budgets.reset_period(session, actor, budget_id, mode)))


@router.put("/budgets/{budget_id}/thresholds")
async def set_budget_thresholds(budget_id: RowId, body: ThresholdsBody, actor: Who, factory: Sessions) -> list[int]:
    return await _write(
        factory, lambda session: list(alerts.set_thresholds(session, actor, budget_id, body.thresholds))
    )


# --- alerts and webhooks ---------------------------------------------------------------------------------------


class MarkReadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[int] = Field(default_factory=list, max_length=500)
    all: bool = False


class WebhookBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=100)
    url: str = Field(max_length=2000)
    events: list[str] = Field(default_factory=list, max_length=10)
    secret_env_var: str | None = Field(default=None, max_length=100)


class WebhookChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    active: bool


@router.get("/alerts")
async def list_alerts(
    actor: Who,
    factory: Sessions,
    unread: bool = False,
    kind: alerts.AlertKind | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[dict[str, Any]]:
    """Alerts this account may see, newest first, each saying whether this account has read it."""
    return await _read(
        factory,
        lambda session: [
            _json(a) for a in alerts.list_alerts(session, actor, unread_only=unread, kind=kind, limit=limit)
        ],
    )


@router.post("/alerts/read")
async def mark_alerts_read(body: MarkReadBody, actor: Who, factory: Sessions) -> dict[str, int]:
    def write(session: Session) -> dict[str, int]:
        marked = alerts.mark_all_read(session, actor) if body.all else alerts.mark_read(session, actor, body.ids)
        return {"marked": marked}

    return await _write(factory, write)


@router.get("/webhooks")
async def list_webhooks(actor: Who, factory: Sessions) -> list[dict[str, Any]]:
    """Webhooks (their signing secrets are never shown again)."""
    return await _read(factory, lambda session: [_json(w) for w in webhooks.list_webhooks(session, actor)])


@router.post("/webhooks", status_code=201)
async def create_webhook(body: WebhookBody, actor: Who, factory: Sessions) -> dict[str, Any]:
    """A new webhook; the answer carries its generated signing secret ONCE (unless `secret_env_var` names it)."""
    return await _write(factory, lambda session: _json(webhooks.create_webhook(session, actor, **body.model_dump())))


@router.put("/webhooks/{webhook_id}")
async def change_webhook(webhook_id: RowId, body: WebhookChange, actor: Who, factory: Sessions) -> dict[str, Any]:
    return await _write(factory, lambda session: _json(webhooks.set_active(session, actor, webhook_id, body.active)))


@router.delete("/webhooks/{webhook_id}")
async def delete_webhook(webhook_id: RowId, actor: Who, factory: Sessions) -> dict[str, Any]:
    return await _write(factory, lambda session: _json(webhooks.delete_webhook(session, actor, webhook_id)))


@router.post("/webhooks/{webhook_id}/test", status_code=202)
async def send_test_webhook(webhook_id: RowId, actor: Who, factory: Sessions) -> JSONResponse:
    """Queue a signed test delivery (the worker posts it; see the delivery log)."""
    delivery = await _write(factory, lambda session: webhooks.send_test(session, actor, webhook_id))
    return JSONResponse({"delivery_id": delivery}, status_code=202)


@router.get("/webhooks/deliveries")
async def webhook_deliveries(
    actor: Who,
    factory: Sessions,
    webhook_id: Annotated[int | None, Query(ge=1, le=2**31)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[dict[str, Any]]:
    """The delivery log: status, attempts, last response code, latency and error."""
    return await _read(
        factory,
        lambda session: [
            _json(d) for d in webhooks.list_deliveries(session, actor, webhook_id=webhook_id, limit=limit)
        ],
    )


# --- recommendations and provider health --------------------------------------------------------------------------


class ChangeCostBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(max_length=64)
    settings: dict[str, Any]


@router.get("/recommendations", response_model=optimizer.OptimizerReport)
async def recommendations(actor: Who, factory: Sessions) -> optimizer.OptimizerReport:
    """What to change to spend less, each with the monthly saving, from the last 30 days."""

    def read(session: Session) -> optimizer.OptimizerReport:
        _staff(session, actor, "read recommendations")
        return optimizer.recommend(session)

    return await _read(factory, read)


@router.post("/recommendations/change-cost")
async def change_cost(body: ChangeCostBody, actor: Who, factory: Sessions) -> dict[str, Any]:
    """What a provider-settings edit would do to monthly spend at last month's volume (nothing is saved)."""

    def read(session: Session) -> dict[str, Any]:
        _staff(session, actor, "estimate a settings change")
        return _object(optimizer.change_cost(session, body.provider, body.settings))

    return await _read(factory, read)


@router.get("/provider-health")
async def provider_health(actor: Who, factory: Sessions) -> list[dict[str, Any]]:
    """Each provider: mode, masked key, health, breaker (state, reason, since, next probe), recent success rate
    and latency, in flight and queued."""

    def read(session: Session) -> list[dict[str, Any]]:
        _staff(session, actor, "read provider health")
        return [_json(s) for s in provider_statuses(session)]

    return await _read(factory, read)
