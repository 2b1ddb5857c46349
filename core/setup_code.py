"""The one-time set-up code that guards first-run admin creation.

The console prints it in the terminal that started it; whoever reaches the port first cannot claim the admin
account without it. It lives only in the server process's memory and is spent once the first admin exists.
"""

from __future__ import annotations

import hmac
import secrets

_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read off a terminal and typed by hand


def new_setup_code() -> str:
    groups = ["".join(secrets.choice(_ALPHABET) for _ in range(4)) for _ in range(3)]
    return "-".join(groups)


def normalise(code: str) -> str:
    return "".join(ch for ch in code.upper() if ch.isalnum())


def setup_code_matches(expected: str, given: str) -> bool:
    """Constant-time comparison, forgiving of case, spaces and dashes."""
    return hmac.compare_digest(normalise(expected).encode(), normalise(given).encode())


def setup_banner(code: str, url_hint: str = "") -> str:
    where = f" at {url_hint}" if url_hint else ""
    line = "=" * 64
    return (
        f"\n{line}\n Imagegate first run: no admin account exists yet.\n"
        f" Open the console{where} and enter this one-time set-up code:\n\n"
        f"     {code}\n\n"
        f" (It is valid until the first admin is created or this process stops.)\n{line}\n"
    )
