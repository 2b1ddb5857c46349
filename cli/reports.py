"""`imagegate report`, `imagegate recommend` and `imagegate forecast`: spend intelligence on the command line.

Registered on the main app by `register(app)` (cli/main.py calls it once). Each command reads through core.spend
and prints text, JSON (`--json`) or, for reports, CSV (`--csv`); errors are mapped by cli/main.py's group.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Annotated

import typer

from cli.tables import echo_rows
from common.errors import InvalidInput
from core.money import format_usd

__all__ = ["register"]


def _money(micros: int | None) -> str:
    return "-" if micros is None else format_usd(micros)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def report(
    date_from: Annotated[
        str | None, typer.Option("--from", help="First UTC day (default: the 1st of this month).")
    ] = None,
    date_to: Annotated[str | None, typer.Option("--to", help="Last UTC day, inclusive (default: today).")] = None,
    by: Annotated[str, typer.Option("--by", help="provider, user, day, month, mode or preset.")] = "provider",
    mode: Annotated[str | None, typer.Option("--mode", help="live or simulated only (default: both, apart).")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="The rows and totals as CSV.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The whole report as JSON.")] = False,
) -> None:
    """Spend by provider, user, day, month, mode or preset from the daily rollups: cost per image against the target,
    latency p50/p95 and success rate per provider, error classes. Live and simulated spend never add up."""
    from cli.main import _day, _runtime
    from core.spend.reports import build_report, report_csv_rows

    if as_csv and as_json:
        raise InvalidInput("choose --csv or --json, not both", {"format": "one of --csv, --json"})
    today = datetime.now(UTC).date()
    start = _day(date_from, "from") or today.replace(day=1)
    end = _day(date_to, "to") or today
    with _runtime().sessions() as session:
        result = build_report(session, date_from=start, date_to=end, by=by, mode=mode)
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    if as_csv:
        records = report_csv_rows(result)
        out = io.StringIO()
        if records:
            writer = csv.DictWriter(out, fieldnames=list(records[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
        typer.echo(out.getvalue(), nl=False)
        return
    target = format_usd(result.target_cost_per_image_micro_usd)
    typer.echo(f"spend {result.date_from} .. {result.date_to} by {result.by}; target {target} per image")
    if not result.rows:
        typer.echo("no usage in this range")
        return
    for row in [*result.rows, *result.totals]:
        flag = "" if row.over_target is None else (" OVER target" if row.over_target else "")
        unknown = f", {row.unknown_billing} billing unknown" if row.unknown_billing else ""
        typer.echo(
            f"{row.spend_mode.upper():<9} {row.label}: {_money(row.actual_micro_usd)} for {row.images} image(s), "
            f"{_money(row.cost_per_image_micro_usd)}/image{flag}; {row.attempts} attempt(s), "
            f"{_rate(row.success_rate)} succeeded{unknown}"
        )
    typer.echo("providers:")
    for p in result.providers:
        typer.echo(
            f"  {p.spend_mode.upper():<9} {p.provider}: success {_rate(p.success_rate)}, p50 {_ms(p.p50_ms)}, "
            f"p95 {_ms(p.p95_ms)}"
        )
    if result.error_classes:
        typer.echo("errors:")
        for e in result.error_classes:
            typer.echo(f"  {e.spend_mode.upper():<9} {e.provider}: {e.error_class} x{e.attempts}")


def recommend(
    mode: Annotated[str, typer.Option("--mode", help="live (default) or simulated.")] = "live",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Cost recommendations from the last 30 days, each with the monthly saving it is worth."""
    from cli.main import _runtime
    from core.spend.optimizer import recommend as advise

    with _runtime().sessions() as session:
        result = advise(session, spend_mode=mode)
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    typer.echo(
        f"{result.spend_mode} {result.date_from} .. {result.date_to}: {_money(result.spend_micro_usd)} for "
        f"{result.images} image(s), {_money(result.cost_per_image_micro_usd)}/image "
        f"(target {format_usd(result.target_cost_per_image_micro_usd)})"
    )
    if not result.recommendations:
        typer.echo("no recommendations")
        return
    for r in result.recommendations:
        typer.echo(f"- {r.title}\n  {r.detail}\n  [{r.id}; basis: {r.basis.requests} request(s), {r.basis.images} "
                   f"image(s), {r.basis.date_from} .. {r.basis.date_to}]")  # fmt: skip


def forecast(
    mode: Annotated[str, typer.Option("--mode", help="live (default) or simulated.")] = "live",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Each active budget's projected spend at the end of its period and when it would run out."""
    from cli.main import _runtime
    from core.spend.forecast import BudgetForecast, forecast_budgets

    with _runtime().sessions() as session:
        rows = forecast_budgets(session, mode=mode)

    def line(r: BudgetForecast) -> str:
        out = "not this period" if r.runs_out_at is None else f"{r.runs_out_at:%Y-%m-%d %H:%M} UTC"
        return (
            f"{r.budget_name} ({r.scope}, {r.period}, {r.mode}): {_money(r.committed_micro_usd)} of "
            f"{_money(r.limit_micro_usd)} so far; projected {_money(r.projected_micro_usd)} "
            f"at {_money(r.daily_rate_micro_usd)}/day; runs out: {out}"
        )

    echo_rows(rows, line, empty="no active budgets", as_json=as_json, to_json=lambda r: r.model_dump(mode="json"))


def register(app: typer.Typer) -> None:
    """Add the commands to the `imagegate` app."""
    app.command("report")(report)
    app.command("recommend")(recommend)
    app.command("forecast")(forecast)
