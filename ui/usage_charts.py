"""The Usage page's plotly figures, built from core.usage_view's figures (one spend mode each, never mixed).

Every figure has its title, dollars formatted and each provider's one colour (ui.charts); no Streamlit here, so
the benchmark times the figure build on its own. Money is exact in core; a figure converts micro-USD to dollars
only to draw it (hover labels show six decimals). Built with graph_objects, one trace per provider: plotly
express took 250-450 ms a figure here (its DataFrame grouping and validation), graph_objects about a tenth."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, time, timedelta

import plotly.graph_objects as go

from core.usage_view import UsageView
from ui import charts

MICRO = 1_000_000
DAY_MS = 86_400_000


def _mode_label(view: UsageView) -> str:
    return "live spend" if view.filters.spend_mode == "live" else "simulated spend (emulator and sandbox)"


def _figure(traces: Iterable[go.Bar]) -> go.Figure:
    return go.Figure(data=list(traces), skip_invalid=True)


def spend_per_day(view: UsageView) -> go.Figure:
    """Stacked bars: each UTC day's actual spend, one colour per provider."""
    per_provider: dict[str, tuple[list[str], list[float]]] = {}
    for d in view.days:
        days, amounts = per_provider.setdefault(d.provider, ([], []))
        days.append(d.day.isoformat())
        amounts.append(d.actual_micro_usd / MICRO)
    fig = _figure(
        go.Bar(
            x=days,
            y=amounts,
            name=provider,
            marker={"color": charts.provider_colour(provider)},
            width=[DAY_MS * 0.8] * len(days),  # on a date axis a bar is 1 ms wide unless told
            hovertemplate="%{x}<br>$%{y:,.6f}<extra>" + provider + "</extra>",
        )
        for provider, (days, amounts) in sorted(per_provider.items())
    )
    fig.update_layout(barmode="stack")
    # The whole range asked for, half a day either side: one day's bar is one day wide, not the whole chart.
    first = datetime.combine(view.filters.date_from, time.min) - timedelta(hours=12)
    last = datetime.combine(view.filters.date_to, time.min) + timedelta(hours=12)
    days_shown = (view.filters.date_to - view.filters.date_from).days + 1
    fig.update_xaxes(
        type="date",
        range=[first.isoformat(), last.isoformat()],
        tickformat="%b %d",
        dtick=DAY_MS if days_shown <= 14 else None,
    )
    fig.update_yaxes(title_text="spend")
    return charts.finish(fig, f"Spend per day by provider: {_mode_label(view)}", unit="day (UTC)")


def cost_per_image(view: UsageView) -> go.Figure:
    """Each provider's cost per image against the global target (a dashed line)."""
    rows = [p for p in view.providers if p.cost_per_image_micro_usd is not None]
    fig = _figure(
        go.Bar(
            x=[p.key],
            y=[(p.cost_per_image_micro_usd or 0) / MICRO],
            name=p.key,
            marker={"color": charts.provider_colour(p.key)},
            hovertemplate="%{x}<br>$%{y:,.6f} per image<extra></extra>",
        )
        for p in rows
    )
    target = view.target_cost_per_image_micro_usd / MICRO
    fig.add_hline(
        y=target,
        line_dash="dash",
        line_color="#333333",
        annotation_text=f"target ${target:,.4f}",
        annotation_position="top left",
    )
    # The target line stays in view even when every provider is far below it.
    top = max([target, *((p.cost_per_image_micro_usd or 0) / MICRO for p in rows)])
    fig.update_yaxes(range=[0, top * 1.2 if top > 0 else 1], title_text="cost per image")
    fig.update_layout(showlegend=False)
    return charts.finish(fig, "Cost per image against the target", unit="provider")


def latency(view: UsageView) -> go.Figure:
    """p50 (solid) and p95 (hatched) latency per provider in seconds, from the rollups' histograms."""
    traces = []
    for name, pattern in (("p50", ""), ("p95", "/")):
        values = [(p.key, p.p50_ms if name == "p50" else p.p95_ms) for p in view.providers]
        shown = [(key, ms / 1000) for key, ms in values if ms is not None]
        traces.append(
            go.Bar(
                x=[key for key, _ in shown],
                y=[seconds for _, seconds in shown],
                name=name,
                marker={
                    "color": [charts.provider_colour(key) for key, _ in shown],
                    "pattern": {"shape": pattern, "fgcolor": "#ffffff"},
                },
                hovertemplate="%{x}<br>" + name + ": %{y:,.2f} s<extra></extra>",
            )
        )
    fig = _figure(traces)
    fig.update_layout(barmode="group", showlegend=False)
    fig.update_yaxes(title_text="seconds", ticksuffix=" s")
    fig.update_xaxes(title_text="provider")
    return charts.finish(fig, "Latency per provider: p50 (solid) and p95 (hatched)", usd_axis=None)


def success_rate(view: UsageView) -> go.Figure:
    """The share of attempts that succeeded, per provider."""
    fig = _figure(
        go.Bar(
            x=[p.key],
            y=[p.success_rate or 0],
            name=p.key,
            marker={"color": charts.provider_colour(p.key)},
            hovertemplate="%{x}<br>%{y:.1%} of attempts succeeded<extra></extra>",
        )
        for p in view.providers
    )
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05], title_text="attempts that succeeded")
    fig.update_xaxes(title_text="provider")
    fig.update_layout(showlegend=False)
    return charts.finish(fig, "Success rate per provider", usd_axis=None)


def error_classes(view: UsageView) -> go.Figure:
    """Failed attempts by error class, one colour per provider."""
    per_provider: dict[str, tuple[list[str], list[int]]] = {}
    for e in view.error_classes:
        classes, counts = per_provider.setdefault(e.provider, ([], []))
        classes.append(e.error_class)
        counts.append(e.attempts)
    fig = _figure(
        go.Bar(
            x=classes,
            y=counts,
            name=provider,
            marker={"color": charts.provider_colour(provider)},
            hovertemplate="%{x}<br>%{y:,} failed attempts<extra>" + provider + "</extra>",
        )
        for provider, (classes, counts) in sorted(per_provider.items())
    )
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title_text="failed attempts", tickformat=",d")
    fig.update_xaxes(title_text="error class")
    return charts.finish(fig, "Failures by error class", usd_axis=None)


def all_figures(view: UsageView) -> list[go.Figure]:
    return [spend_per_day(view), cost_per_image(view), latency(view), success_rate(view), error_classes(view)]
