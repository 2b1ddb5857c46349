"""Listings printed by the CLI's `list`-style commands, all one way: `--json` prints the rows as one JSON list
(`[]` when there are none, so scripts never parse a sentence); otherwise one line per row, or a sentence saying
there are none (and, where it helps, how to create one)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer

Row = TypeVar("Row")


def echo_rows(
    rows: Sequence[Row],
    line: Callable[[Row], str],
    *,
    empty: str,
    as_json: bool = False,
    to_json: Callable[[Row], Any] | None = None,
    header: str | None = None,
) -> None:
    """Print `rows`: with `as_json` a JSON list of `to_json(row)` (of the rows themselves when None: they are
    already JSON-shaped); else `header` when given, then `line(row)` for each row (it may hold several lines), or
    `empty` when there are none."""
    if as_json:
        typer.echo(json.dumps([to_json(row) for row in rows] if to_json else list(rows), indent=2))
        return
    if header is not None:
        typer.echo(header)
    if not rows:
        typer.echo(empty)
        return
    for row in rows:
        typer.echo(line(row))
