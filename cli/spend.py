"""`imagegate alerts ...` and `imagegate webhooks ...`: spend alerts, read marks, thresholds and webhooks.

Like every command, these call core and act as the CLI's system actor (`cli:<os user>`), except where a person's
own state is concerned: read marks belong to an account, so `alerts list --unread` and `alerts read` need
`--as USER`. Errors are mapped to exit codes by cli.main's group. cli.main is imported inside the commands (it
registers these apps, so importing it at the top would be circular).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from cli.tables import echo_rows
from common.errors import InvalidInput

alerts_app = typer.Typer(help="Spend alerts: budget thresholds, breakers, spend anomalies.", no_args_is_help=True)
webhooks_app = typer.Typer(help="Webhooks that receive alerts, signed with HMAC-SHA256.", no_args_is_help=True)

AS_USER = typer.Option("--as", help="The account whose read marks are used (needed for --unread).")


def _runtime() -> Any:
    from cli.main import _runtime as runtime

    return runtime()


def _actor(runtime: Any, as_user: str | None) -> Any:
    from cli.main import _acting

    return _acting(runtime, as_user)


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()


# --- alerts ---------------------------------------------------------------------------------------------------


@alerts_app.command("list")
def alerts_list(
    unread: Annotated[bool, typer.Option("--unread", help="Only alerts this account has not read.")] = False,
    as_user: Annotated[str | None, AS_USER] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="budget_threshold, breaker_open or spend_anomaly.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Alerts, newest first (an account sees what its role may: a USER only their own budgets' alerts)."""
    from core.spend.alerts import AlertKind, AlertView, list_alerts

    if kind is not None and kind not in {k.value for k in AlertKind}:
        msg = f"--kind is one of {', '.join(k.value for k in AlertKind)}"
        raise InvalidInput(msg, {"kind": msg})
    runtime = _runtime()
    actor = _actor(runtime, as_user)
    with runtime.sessions() as session:
        rows = list_alerts(session, actor, unread_only=unread, kind=kind, limit=limit)

    def line(a: AlertView) -> str:
        mark = " " if a.read or as_user is None else "*"
        return (
            f"{mark}#{a.id} {a.fired_at:%Y-%m-%d %H:%M} UTC [{a.kind.value}] {a.title} (webhooks: {a.delivery_status})"
        )

    echo_rows(
        rows,
        line,
        empty="no unread alerts" if unread else "no alerts",
        as_json=as_json,
        to_json=lambda a: {
            "id": a.id,
            "kind": a.kind.value,
            "title": a.title,
            "fired_at": _iso(a.fired_at),
            "provider": a.provider,
            "spent_micro_usd": a.spent_micro_usd,
            "limit_micro_usd": a.limit_micro_usd,
            "delivery_status": a.delivery_status,
            "read": a.read,
            "details": a.details,
        },
    )


@alerts_app.command("read")
def alerts_read(
    ids: Annotated[list[int] | None, typer.Argument(help="Alert ids to mark read.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Mark every alert this account may see as read.")] = False,
    as_user: Annotated[str | None, AS_USER] = None,
) -> None:
    """Mark alerts read for one account (`--as USER`)."""
    from core.spend.alerts import mark_all_read, mark_read
    from db.engine import transaction

    if as_user is None:
        raise InvalidInput("read marks belong to an account: name it with --as USER", {"as": "required"})
    if bool(ids) == all_:
        raise InvalidInput("give alert ids or --all (not both)", {"ids": "ids or --all"})
    runtime = _runtime()
    actor = _actor(runtime, as_user)
    with transaction(runtime.sessions) as session:
        marked = mark_all_read(session, actor) if all_ else mark_read(session, actor, ids or [])
    typer.echo(f"marked {marked} alert(s) read for {as_user}")


@alerts_app.command("thresholds")
def alerts_thresholds(
    budget: Annotated[str, typer.Argument(help="The budget's id or name.")],
    percents: Annotated[list[int] | None, typer.Argument(help="New thresholds in percent, e.g. 50 80 100.")] = None,
    off: Annotated[bool, typer.Option("--off", help="No threshold alerts for this budget.")] = False,
    comment: Annotated[str | None, typer.Option("--comment", help="Why (kept in the audit log).")] = None,
) -> None:
    """Show a budget's alert thresholds, or replace them (default 50 80 100)."""
    from cli.main import _cli_actor, _find_budget
    from core.spend.alerts import set_thresholds, thresholds
    from db.engine import transaction

    if off and percents:
        raise InvalidInput("give thresholds or --off, not both", {"percents": "thresholds or --off"})
    runtime = _runtime()
    with transaction(runtime.sessions) as session:
        view = _find_budget(session, budget)
        if percents or off:
            set_thresholds(session, _cli_actor(), view.id, percents or [], comment=comment)
        current, default = thresholds(session, view.id)
    shown = " ".join(f"{t}%" for t in current) or "none (alerts off)"
    typer.echo(f"#{view.id} {view.name}: {shown}{' (the defaults)' if default else ''}")


def _pass_report(report: Any) -> dict[str, Any]:
    return {
        "alerts": report.alerts,
        "attempted": report.attempted,
        "delivered": report.delivered,
        "retrying": report.retrying,
        "failed": report.failed,
        "errors": report.errors,
    }


@alerts_app.command("run")
def alerts_run(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """One detection pass and one webhook delivery pass: what the worker does on each turn."""
    from core.spend.delivery import run_pass

    runtime = _runtime()
    report = asyncio.run(run_pass(runtime.sessions))
    if as_json:
        typer.echo(json.dumps(_pass_report(report), indent=2))
        return
    typer.echo(
        f"alerts fired: {report.alerts}; deliveries attempted: {report.attempted} (delivered {report.delivered}, "
        f"to retry {report.retrying}, failed {report.failed})"
    )
    for line in report.errors:
        typer.echo(f"  {line}")


# --- webhooks -------------------------------------------------------------------------------------------------


@webhooks_app.command("create")
def webhooks_create(
    name: Annotated[str, typer.Argument(help="A name people recognise.")],
    url: Annotated[str, typer.Argument(help="http(s) URL the alerts are POSTed to.")],
    events: Annotated[
        list[str] | None,
        typer.Option("--events", help="Only these kinds (repeat or comma-separate); default: every kind."),
    ] = None,
    secret_env: Annotated[
        str | None, typer.Option("--secret-env", help="Sign with the secret in this environment variable.")
    ] = None,
) -> None:
    """Create a webhook. Without --secret-env a signing secret is generated and printed ONCE."""
    from cli.main import _cli_actor
    from core.spend.webhooks import create_webhook, display_url
    from db.engine import transaction

    kinds = [part.strip() for value in events or [] for part in value.split(",") if part.strip()]
    runtime = _runtime()
    with transaction(runtime.sessions) as session:
        made = create_webhook(session, _cli_actor(), name=name, url=url, events=kinds, secret_env_var=secret_env)
    hook = made.webhook
    typer.echo(
        f"created webhook #{hook.id} {hook.name} -> {display_url(hook.url)} ({', '.join(hook.events) or 'every event'})"
    )
    if made.secret is not None:
        typer.echo("signing secret (shown once; store it with the receiver now):")
        typer.echo(made.secret)
    else:
        typer.echo(f"signing secret: the value of ${secret_env} in the environment of every process that delivers")


@webhooks_app.command("list")
def webhooks_list(
    include_deleted: Annotated[bool, typer.Option("--all", help="Include deleted webhooks.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Webhooks (never their secrets), each with its latest delivery."""
    from cli.main import _cli_actor
    from core.spend.webhooks import display_url, list_deliveries, list_webhooks

    runtime = _runtime()
    actor = _cli_actor()
    with runtime.sessions() as session:
        hooks = list_webhooks(session, actor, include_deleted=include_deleted)
        latest = {h.id: list_deliveries(session, actor, webhook_id=h.id, limit=1) for h in hooks}
    rows: list[dict[str, Any]] = [
        {
            "id": h.id,
            "name": h.name,
            "url": display_url(h.url),
            "events": list(h.events),
            "secret": h.secret_source,
            "active": h.active,
            "deleted": h.deleted_at is not None,
            "last_delivery": (
                {"status": d[0].status, "response_code": d[0].response_code, "at": _iso(d[0].created_at)}
                if (d := latest[h.id])
                else None
            ),
        }
        for h in hooks
    ]

    def line(row: dict[str, Any]) -> str:
        state = "deleted" if row["deleted"] else ("active" if row["active"] else "disabled")
        last = row["last_delivery"]
        last_text = f"last: {last['status']} ({last['response_code'] or '-'})" if last else "never called"
        return (
            f"#{row['id']} {row['name']} -> {row['url']} [{state}] events: {', '.join(row['events']) or 'all'}; "
            f"secret: {row['secret']}; {last_text}"
        )

    echo_rows(rows, line, empty="no webhooks (create one with `imagegate webhooks create NAME URL`)", as_json=as_json)


@webhooks_app.command("test")
def webhooks_test(webhook_id: Annotated[int, typer.Argument(help="The webhook's id.")]) -> None:
    """Send a signed test delivery now (and run one delivery pass); prints what the receiver answered."""
    from cli.main import _cli_actor
    from core.spend.delivery import run_pass
    from core.spend.webhooks import get_delivery, send_test
    from db.engine import transaction

    runtime = _runtime()
    with transaction(runtime.sessions) as session:
        delivery_id = send_test(session, _cli_actor(), webhook_id)
    asyncio.run(run_pass(runtime.sessions, detect=False))
    with runtime.sessions() as session:
        outcome = get_delivery(session, delivery_id)
    if outcome.status == "delivered":
        typer.echo(f"delivered (HTTP {outcome.response_code}, {outcome.response_ms} ms)")
        return
    typer.echo(
        f"not delivered: {outcome.last_error or 'not attempted yet'}; the worker retries at "
        f"{_iso(outcome.next_attempt_at) or '-'} (attempt {outcome.attempts} of 6)"
    )
    raise typer.Exit(1)


@webhooks_app.command("disable")
def webhooks_disable(webhook_id: Annotated[int, typer.Argument(help="The webhook's id.")]) -> None:
    """Stop calling a webhook (its pending deliveries fail now)."""
    _set_active(webhook_id, False)


@webhooks_app.command("enable")
def webhooks_enable(webhook_id: Annotated[int, typer.Argument(help="The webhook's id.")]) -> None:
    """Call a disabled webhook again (for alerts from now on)."""
    _set_active(webhook_id, True)


def _set_active(webhook_id: int, active: bool) -> None:
    from cli.main import _cli_actor
    from core.spend.webhooks import set_active
    from db.engine import transaction

    runtime = _runtime()
    with transaction(runtime.sessions) as session:
        view = set_active(session, _cli_actor(), webhook_id, active)
    typer.echo(f"webhook #{view.id} {view.name} is {'active' if view.active else 'disabled'}")


@webhooks_app.command("delete")
def webhooks_delete(webhook_id: Annotated[int, typer.Argument(help="The webhook's id.")]) -> None:
    """Delete a webhook (soft: its delivery log stays; its secret is erased)."""
    from cli.main import _cli_actor
    from core.spend.webhooks import delete_webhook
    from db.engine import transaction

    runtime = _runtime()
    with transaction(runtime.sessions) as session:
        view = delete_webhook(session, _cli_actor(), webhook_id)
    typer.echo(f"deleted webhook #{view.id} {view.name}")


@webhooks_app.command("log")
def webhooks_log(
    webhook_id: Annotated[int | None, typer.Argument(help="One webhook's deliveries (default: all).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The delivery log: status, attempts, response code, latency, last error."""
    from cli.main import _cli_actor
    from core.spend.webhooks import DeliveryView, list_deliveries

    runtime = _runtime()
    with runtime.sessions() as session:
        rows = list_deliveries(session, _cli_actor(), webhook_id=webhook_id, limit=limit)

    def line(d: DeliveryView) -> str:
        code = d.response_code or "-"
        ms = f"{d.response_ms} ms" if d.response_ms is not None else "-"
        error = f"; {d.last_error}" if d.last_error else ""
        return (
            f"#{d.id} webhook #{d.webhook_id} {d.event_type}: {d.status}, {d.attempts} attempt(s), {code}, {ms}{error}"
        )

    echo_rows(
        rows,
        line,
        empty="no deliveries",
        as_json=as_json,
        to_json=lambda d: {
            "id": d.id,
            "webhook_id": d.webhook_id,
            "alert_id": d.alert_event_id,
            "event": d.event_type,
            "status": d.status,
            "attempts": d.attempts,
            "response_code": d.response_code,
            "response_ms": d.response_ms,
            "last_error": d.last_error,
            "next_attempt_at": _iso(d.next_attempt_at),
            "delivered_at": _iso(d.delivered_at),
        },
    )
