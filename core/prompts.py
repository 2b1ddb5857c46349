"""Checking prompts before they reach a provider.

A prompt is text a person typed or pasted: it is stripped, must not be empty (the negative prompt may be),
must fit `core.catalog.PROMPT_MAX_CHARS`, and must not carry control characters other than line breaks and
tabs. Control characters are refused, not removed: they usually come from a bad paste or a script bug, and a
provider that silently receives something else than what was shown is worse than a clear error.
Windows line ends (CR LF) are turned into LF first, since text areas in some browsers send them.
"""

from __future__ import annotations

import unicodedata

from common.errors import InvalidInput
from core.catalog import PROMPT_MAX_CHARS

_ALLOWED_CONTROLS = {"\n", "\t"}

_C0_NAMES = (
    "NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM SUB ESC FS GS RS US"
).split()


def _control_name(ch: str) -> str:
    code = ord(ch)
    if code < 0x20:
        return _C0_NAMES[code]
    if code == 0x7F:
        return "DEL"
    return "C1 control"


def _describe(ch: str) -> str:
    return f"U+{ord(ch):04X} ({_control_name(ch)})"


def _check(text: object, *, field: str, allow_empty: bool) -> str:
    if not isinstance(text, str):
        raise InvalidInput(f"{field} must be text", {field: f"{field} must be text, not {type(text).__name__}"})
    bad = [
        (i, ch)
        for i, ch in enumerate(text)
        if unicodedata.category(ch) == "Cc"
        and ch not in _ALLOWED_CONTROLS
        and not (ch == "\r" and text[i + 1 : i + 2] == "\n")
    ]
    if bad:
        pos, ch = bad[0]
        # Positions are 1-based and counted in the text as given, so a person can find the character.
        msg = f"{field} contains control character {_describe(ch)} at position {pos + 1}"
        if len(bad) > 1:
            msg += f" (and {len(bad) - 1} more)"
        msg += "; only line breaks and tabs are allowed"
        raise InvalidInput(msg, {field: msg})
    cleaned = text.replace("\r\n", "\n").strip()
    if not cleaned and not allow_empty:
        msg = f"{field} is empty; describe the image to generate"
        raise InvalidInput(msg, {field: msg})
    if len(cleaned) > PROMPT_MAX_CHARS:
        msg = f"{field} is {len(cleaned)} characters long; the limit is {PROMPT_MAX_CHARS}"
        raise InvalidInput(msg, {field: msg})
    return cleaned


def validate_prompt(text: str, *, field: str = "prompt") -> str:
    """The prompt, stripped. Raises InvalidInput (with `field_errors[field]`) when it is empty, too long, or
    contains a control character other than a line break or a tab."""
    return _check(text, field=field, allow_empty=False)


def validate_negative_prompt(text: str, *, field: str = "negative_prompt") -> str:
    """Like `validate_prompt`, but an empty negative prompt is fine (it means "nothing to avoid")."""
    return _check(text, field=field, allow_empty=True)


def prompt_problem(text: object, *, field: str = "prompt", allow_empty: bool = False) -> str | None:
    """The message for what is wrong with a prompt, or None when it is fine (for collecting field errors)."""
    try:
        _check(text, field=field, allow_empty=allow_empty)
    except InvalidInput as exc:
        return exc.field_errors.get(field, str(exc))
    return None
