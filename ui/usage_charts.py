"""The Usage page's plotly figures, built from core.usage_view's figures (one spend mode each, never mixed).

Every figure has its title, dollars formatted and each provider's one colour (ui.charts); no Streamlit here, so
the benchmark times the figure build on its own. Money is exact in core; a figure converts micro-USD to dollars
only to draw it (hover labels show six decimals)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from core.usage_view import UsageView
from ui import charts

MICRO = 1_000_000


def _mode_label(view: UsageView) -> str:
    return "live spend" if view.filters.spend_mode == "live" else "simulated spend (emulator and sandbox)"


def spend_per_day(view: UsageView) -> go.Figure:
    """Stacked bars: each UTC day's actual spend, one colour per provider."""
    frame = pd.DataFrame(
        [{"day": d.day, "provider": d.provider, "spend": d.actual_micro_usd / MICRO} for d in view.days],
        columns=["day", "provider", "spend"],
    )
    fig = px.bar(
        frame,
        x="day",
        y="spend",
        color="provider",
        color_discrete_map=charts.colour_map(),
        category_orders={"provider": sorted(set(frame["provider"]))},
    )
    fig.update_traces(hovertemplate="%{x|%Y-%m-%d}<br>$%{y:,.6f}<extra>%{fullData.name}</extra>")
    fig.update_xaxes(tickformat="%b %d", dtick=86_400_000 if len(set(frame["day"])) <= 14 else None)
    fig.update_layout(barmode="stack")
    return charts.finish(fig, f"Spend per day by provider: {_mode_label(view)}", unit="day (UTC)")


def cost_per_image(view: UsageView) -> go.Figure:
    """Each provider's cost per image against the global target (a dashed line)."""
    rows = [p for p in view.providers if p.cost_per_image_micro_usd is not None]
    frame = pd.DataFrame(
        [{"provider": p.key, "per_image": (p.cost_per_image_micro_usd or 0) / MICRO} for p in rows],
        columns=["provider", "per_image"],
    )
    fig = px.bar(frame, x="provider", y="per_image", color="provider", color_discrete_map=charts.colour_map())
    target = view.target_cost_per_image_micro_usd / MICRO
    fig.add_hline(
        y=target,
        line_dash="dash",
        line_color="#333333",
        annotation_text=f"target ${target:,.4f}",
        annotation_position="top left",
    )
    fig.update_traces(hovertemplate="%{x}<br>$%{y:,.6f} per image<extra></extra>")
    fig.update_layout(showlegend=False)
    # The target line stays in view even when every provider is far below it.
    top = max([target, *frame["per_image"].tolist()]) if len(frame) else target
    fig.update_yaxes(range=[0, top * 1.2 if top > 0 else 1])
    return charts.finish(fig, "Cost per image against the target", unit="provider")


def latency(view: UsageView) -> go.Figure:
    """p50 (solid) and p95 (hatched) latency per provider, from the rollups' histograms."""
    records = []
    for p in view.providers:
        for name, value in (("p50", p.p50_ms), ("p95", p.p95_ms)):
            if value is not None:
                records.append({"provider": p.key, "percentile": name, "seconds": value / 1000})
    frame = pd.DataFrame(records, columns=["provider", "percentile", "seconds"])
    fig = px.bar(
        frame,
        x="provider",
        y="seconds",
        color="provider",
        pattern_shape="percentile",
        pattern_shape_map={"p50": "", "p95": "/"},
        barmode="group",
        color_discrete_map=charts.colour_map(),
    )
    fig.update_traces(hovertemplate="%{x}<br>%{y:,.2f} s<extra>%{fullData.name}</extra>")
    fig.update_yaxes(title_text="seconds", ticksuffix=" s")
    fig.update_xaxes(title_text="provider")
    return charts.finish(fig, "Latency per provider: p50 (solid) and p95 (hatched)", usd_axis=None)


def success_rate(view: UsageView) -> go.Figure:
    """The share of attempts that succeeded, per provider."""
    frame = pd.DataFrame(
        [{"provider": p.key, "rate": p.success_rate, "attempts": p.attempts} for p in view.providers],
        columns=["provider", "rate", "attempts"],
    )
    fig = px.bar(frame, x="provider", y="rate", color="provider", color_discrete_map=charts.colour_map())
    fig.update_traces(hovertemplate="%{x}<br>%{y:.1%} of attempts succeeded<extra></extra>")
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05], title_text="attempts that succeeded")
    fig.update_layout(showlegend=False)
    fig.update_xaxes(title_text="provider")
    return charts.finish(fig, "Success rate per provider", usd_axis=None)


def error_classes(view: UsageView) -> go.Figure:
    """Failed attempts by error class, one colour per provider."""
    frame = pd.DataFrame(
        [{"error class": e.error_class, "provider": e.provider, "attempts": e.attempts} for e in view.error_classes],
        columns=["error class", "provider", "attempts"],
    )
    fig = px.bar(
        frame, x="error class", y="attempts", color="provider", color_discrete_map=charts.colour_map(), barmode="stack"
    )
    fig.update_traces(hovertemplate="%{x}<br>%{y:,} failed attempts<extra>%{fullData.name}</extra>")
    fig.update_yaxes(title_text="failed attempts", tickformat=",d")
    fig.update_xaxes(title_text="error class")
    return charts.finish(fig, "Failures by error class", usd_axis=None)


def all_figures(view: UsageView) -> list[go.Figure]:
    return [spend_per_day(view), cost_per_image(view), latency(view), success_rate(view), error_classes(view)]
