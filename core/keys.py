"""Provider API keys: where they come from, whether one is configured, and how to show one without showing it.

Keys come from the environment or, in the console, from Streamlit secrets (app.py registers them here). They
are never stored in the database, never logged, never exported; only `mask_secret` output may be displayed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from core.catalog import ProviderSpec, get_provider

_extra_sources: list[Mapping[str, str]] = []


def register_secret_source(values: Mapping[str, str]) -> None:
    """Add a read-only source of secrets (Streamlit's st.secrets) consulted after the environment."""
    _extra_sources.append(dict(values))


def clear_secret_sources() -> None:
    _extra_sources.clear()


def _lookup(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    if value:
        return value
    for source in _extra_sources:
        raw = source.get(name)
        if isinstance(raw, str) and raw.strip():
            return raw.strip()
    return None


@dataclass(frozen=True)
class KeyStatus:
    provider: str
    configured: bool
    env_vars: tuple[str, ...]
    """The variables that make up the configured credential, or every accepted alternative when none is."""
    masked: str

    def __repr__(self) -> str:  # never leak through a debugger or log line
        return f"KeyStatus(provider={self.provider!r}, configured={self.configured}, masked={self.masked!r})"


def mask_secret(value: str | None) -> str:
    """`fal-…a1b2 (36 chars)`: enough to tell two keys apart, never enough to use one."""
    if not value:
        return "not set"
    if len(value) < 12:
        return f"•••• ({len(value)} chars)"
    return f"{value[:4]}…{value[-4:]} ({len(value)} chars)"


def provider_key(provider: ProviderSpec | str) -> str | None:
    """The credential for a provider as its client expects it (fal: `id:secret` from the two-part form)."""
    spec = get_provider(provider) if isinstance(provider, str) else provider
    for alternative in spec.key_env_vars:
        values = [_lookup(name) for name in alternative]
        if all(values):
            return ":".join(v for v in values if v)
    return None


def key_status(provider: ProviderSpec | str) -> KeyStatus:
    spec = get_provider(provider) if isinstance(provider, str) else provider
    for alternative in spec.key_env_vars:
        values = [_lookup(name) for name in alternative]
        if all(values):
            return KeyStatus(spec.id, True, alternative, mask_secret(":".join(v for v in values if v)))
    every = tuple(name for alt in spec.key_env_vars for name in alt)
    return KeyStatus(spec.id, False, every, "not set")
