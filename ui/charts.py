"""One look for every chart in the console: each provider has ONE colour on every page, money axes show
dollars, every chart has a title. Pages build plotly figures with these; no page picks its own colours."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.catalog import PROVIDERS

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

# Okabe-Ito colours (told apart with the common colour-vision deficiencies); grey for the offline sandbox.
PROVIDER_COLOURS: dict[str, str] = {
    "fal-qwen": "#0072B2",
    "ideogram": "#E69F00",
    "huggingface": "#CC79A7",
    "qwen": "#009E73",
    "sandbox": "#999999",
}
OTHER_COLOUR = "#56B4E9"
"""Anything that is not a catalog provider (an "other" bucket, a total)."""

assert set(PROVIDER_COLOURS) == set(PROVIDERS), "every catalog provider needs its colour"


def provider_colour(provider: str) -> str:
    return PROVIDER_COLOURS.get(provider, OTHER_COLOUR)


def colour_map() -> dict[str, str]:
    """For plotly express: `color_discrete_map=colour_map()` with `color="provider"`."""
    return dict(PROVIDER_COLOURS)


def finish(fig: Figure, title: str, *, usd_axis: str | None = "y", unit: str | None = None) -> Figure:
    """Give a figure its title, a dollar-formatted money axis (`usd_axis`: "x", "y" or None) and, when `unit`
    is given, the other axis's unit; a compact layout that fits the console's columns."""
    fig.update_layout(title={"text": title}, margin={"l": 10, "r": 10, "t": 50, "b": 10}, legend_title_text="")
    if usd_axis == "y":
        fig.update_yaxes(tickprefix="$", tickformat=",.6~f")
    elif usd_axis == "x":
        fig.update_xaxes(tickprefix="$", tickformat=",.6~f")
    if unit is not None:
        other = fig.update_xaxes if usd_axis == "y" else fig.update_yaxes
        other(title_text=unit)
    return fig
