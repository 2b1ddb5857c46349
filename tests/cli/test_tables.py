"""cli.tables.echo_rows: the one way list commands print (JSON, a line per row, or a sentence when empty)."""

from __future__ import annotations

import json

import pytest

from cli.tables import echo_rows

ROWS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def _line(row: dict[str, object]) -> str:
    return f"#{row['id']} {row['name']}"


def test_lines_after_the_header(capsys: pytest.CaptureFixture[str]) -> None:
    echo_rows(ROWS, _line, empty="none", header="two rows")
    assert capsys.readouterr().out == "two rows\n#1 a\n#2 b\n"


def test_the_empty_sentence_still_follows_the_header(capsys: pytest.CaptureFixture[str]) -> None:
    echo_rows([], _line, empty="no rows (create one)", header="two rows")
    assert capsys.readouterr().out == "two rows\nno rows (create one)\n"


def test_json_is_the_rows_or_their_mapping_and_never_the_header(capsys: pytest.CaptureFixture[str]) -> None:
    echo_rows(ROWS, _line, empty="none", header="two rows", as_json=True)
    assert json.loads(capsys.readouterr().out) == ROWS
    echo_rows(ROWS, _line, empty="none", as_json=True, to_json=lambda row: row["id"])
    assert json.loads(capsys.readouterr().out) == [1, 2]


def test_json_of_no_rows_is_an_empty_list_not_the_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    echo_rows([], _line, empty="none", as_json=True, to_json=lambda row: row)
    assert capsys.readouterr().out == "[]\n"
