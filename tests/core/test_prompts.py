"""Prompt checks: stripping, empty prompts, control characters, length limit."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.errors import InvalidInput
from core.catalog import PROMPT_MAX_CHARS
from core.prompts import prompt_problem, validate_negative_prompt, validate_prompt

CONTROL_CHARS = [chr(c) for c in range(0x20) if chr(c) not in "\n\t"] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)]

# Text a person could type: no control characters at all (line breaks and tabs are added separately).
_typed = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from(["\n", "\t"]),
    max_size=200,
)


def test_prompt_is_stripped_and_keeps_line_breaks_and_tabs():
    assert validate_prompt("  a cat\n\ton a mat  \n") == "a cat\n\ton a mat"


def test_windows_line_ends_become_line_feeds():
    assert validate_prompt("a cat\r\non a mat") == "a cat\non a mat"


def test_positions_count_the_text_as_given_even_after_windows_line_ends():
    assert "U+0007 (BEL) at position 5" in (prompt_problem("a\r\nb\x07") or "")


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_empty_prompt_is_refused(text):
    with pytest.raises(InvalidInput) as info:
        validate_prompt(text)
    assert "prompt is empty" in info.value.field_errors["prompt"]


def test_empty_negative_prompt_is_fine():
    assert validate_negative_prompt("   ") == ""


@pytest.mark.parametrize("ch", CONTROL_CHARS)
def test_every_control_character_is_refused_with_code_and_position(ch):
    with pytest.raises(InvalidInput) as info:
        validate_prompt("a cat" + ch + "dog")
    msg = info.value.field_errors["prompt"]
    assert f"U+{ord(ch):04X}" in msg
    assert "position 6" in msg


def test_control_character_names_are_readable():
    msg = prompt_problem("ring\x07bell")
    assert msg is not None
    assert "U+0007 (BEL) at position 5" in msg
    assert "only line breaks and tabs are allowed" in msg


def test_lone_carriage_return_is_refused():
    assert prompt_problem("a\rb") is not None


def test_several_control_characters_are_counted_and_the_first_is_named():
    msg = prompt_problem("\x1bab\x00c\x07")
    assert msg is not None
    assert "U+001B (ESC) at position 1" in msg
    assert "(and 2 more)" in msg


def test_control_character_at_the_edge_is_refused_not_stripped():
    # \x1c-\x1f count as whitespace for str.strip(); they must still be refused.
    assert prompt_problem("a cat\x1f") is not None
    assert prompt_problem("\x0ba cat") is not None


def test_negative_prompt_reports_its_own_field():
    with pytest.raises(InvalidInput) as info:
        validate_negative_prompt("blurry\x00")
    assert list(info.value.field_errors) == ["negative_prompt"]
    assert info.value.field_errors["negative_prompt"].startswith("negative_prompt contains control character")


def test_custom_field_name_is_used():
    with pytest.raises(InvalidInput) as info:
        validate_prompt("", field="requests.3.prompt")
    assert "requests.3.prompt" in info.value.field_errors


def test_length_limit_applies_after_stripping():
    exactly = "x" * PROMPT_MAX_CHARS
    assert validate_prompt("  " + exactly + "\n") == exactly
    with pytest.raises(InvalidInput) as info:
        validate_prompt(exactly + "y")
    msg = info.value.field_errors["prompt"]
    assert f"{PROMPT_MAX_CHARS + 1} characters" in msg
    assert f"limit is {PROMPT_MAX_CHARS}" in msg


def test_overlong_negative_prompt_is_refused():
    assert prompt_problem("n" * (PROMPT_MAX_CHARS + 5), field="negative_prompt", allow_empty=True) == (
        f"negative_prompt is {PROMPT_MAX_CHARS + 5} characters long; the limit is {PROMPT_MAX_CHARS}"
    )


@pytest.mark.parametrize("value", [None, 42, b"bytes", ["a"]])
def test_non_text_is_refused(value):
    with pytest.raises(InvalidInput) as info:
        validate_prompt(value)
    assert "must be text" in info.value.field_errors["prompt"]


@settings(deadline=None)
@given(_typed)
def test_typed_text_is_accepted_as_stripped_text_or_refused_as_empty(text):
    if text.strip():
        assert validate_prompt(text) == text.strip()
    else:
        assert "is empty" in (prompt_problem(text) or "")


@settings(deadline=None)
@given(_typed, st.sampled_from(CONTROL_CHARS), st.data())
def test_any_control_character_anywhere_is_refused_at_its_position(text, ch, data):
    pos = data.draw(st.integers(0, len(text)))
    assume(not (ch == "\r" and text[pos : pos + 1] == "\n"))  # CR LF is a line end, not a control character
    msg = prompt_problem(text[:pos] + ch + text[pos:])
    assert msg is not None
    assert f"U+{ord(ch):04X}" in msg
    assert f"position {pos + 1}" in msg


def test_format_characters_are_not_control_characters():
    # Zero-width joiners appear in emoji sequences; they are Cf, not Cc, and must pass.
    text = "family \U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert unicodedata.category("\u200d") == "Cf"
    assert validate_prompt(text) == text
