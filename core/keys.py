"""Provider API keys: where they come from, whether one is configured, and how to show one without showing it.

Keys come from the environment or, in the console, from Streamlit secrets (app.py registers them here). They
are never stored in the database, never logged, never exported; only `mask_secret` output may be displayed.

Where a key may go: a key is sent only to its provider's own hosts over https (`KEY_HOSTS`), or to an endpoint
URL the operator allowed in the environment (`IMAGEGATE_HF_ALLOWED_ENDPOINTS`, or the emulator's
`IMAGEGATE_EMULATOR_URL`), https or plain http on a loopback address. Settings that could send a key
elsewhere are refused at validation (`key_destination_problem`), and adapters check again before sending.
Text that contains a configured key's value is refused wherever it would be stored (`keys_in`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from core.catalog import PROVIDERS, ProviderSpec, get_provider

MIN_SECRET_PART_CHARS = 8
"""Parts of a two-part credential shorter than this are not searched for in text (too many false matches)."""
HF_ALLOWED_ENDPOINTS_ENV = "IMAGEGATE_HF_ALLOWED_ENDPOINTS"
"""Comma-separated URL prefixes that may receive the HF token besides Hugging Face's own hosts."""
EMULATOR_URL_ENV = "IMAGEGATE_EMULATOR_URL"
"""The same variable as core.providers.registry.EMULATOR_URL_ENV (which imports this module)."""

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


def configured_secrets() -> list[tuple[str, str]]:
    """(variable names, value) of every configured key and of each long enough part of a two-part one."""
    found: list[tuple[str, str]] = []
    for spec in PROVIDERS.values():
        for alternative in spec.key_env_vars:
            values = [_lookup(name) for name in alternative]
            if all(values):
                found.append(("+".join(alternative), ":".join(v for v in values if v)))
            found.extend(
                (name, value)
                for name, value in zip(alternative, values, strict=True)
                if len(alternative) > 1 and value and len(value) >= MIN_SECRET_PART_CHARS
            )
    return found


def key_in_text(text: str) -> str | None:
    """The name of the configured key whose value `text` contains (never the value), or None."""
    for names, value in configured_secrets():
        if value in text:
            return names
    return None


def redact(text: str) -> str:
    """`text` with every configured key's value replaced by `<NAME value>`: for messages that quote input."""
    for names, value in configured_secrets():
        text = text.replace(value, f"<{names} value>")
    return text


def _strings(data: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, text) of every string in nested mappings and lists, mapping keys included. Not recursive."""
    stack: list[tuple[Any, str]] = [(data, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            yield where, node
        elif isinstance(node, Mapping):
            for key, value in node.items():
                child = f"{where}.{key}" if where else str(key)
                if isinstance(key, str):
                    yield child, key
                stack.append((value, child))
        elif isinstance(node, list | tuple):
            stack.extend((value, f"{where}[{i}]") for i, value in enumerate(node))


def keys_in(data: Any, path: str = "") -> dict[str, str]:
    """Field errors for every string in `data` that contains a configured key's value, keyed by its path.
    The messages name the key's variable, never its value."""
    secrets = configured_secrets()
    if not secrets:
        return {}
    errors: dict[str, str] = {}
    for where, text in _strings(data, path):
        for names, value in secrets:
            if value in text:
                # The path itself may hold the key (a mapping key): redacted, since paths are printed.
                errors[redact(where) or "value"] = (
                    f"contains the value of the configured API key {names}; keys are never stored, remove it"
                )
                break
    return errors


def key_status(provider: ProviderSpec | str) -> KeyStatus:
    spec = get_provider(provider) if isinstance(provider, str) else provider
    for alternative in spec.key_env_vars:
        values = [_lookup(name) for name in alternative]
        if all(values):
            return KeyStatus(spec.id, True, alternative, mask_secret(":".join(v for v in values if v)))
    every = tuple(name for alt in spec.key_env_vars for name in alt)
    return KeyStatus(spec.id, False, every, "not set")


# --- where a key may be sent ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyHosts:
    """The hosts a provider's key may be sent to over https: these names and their subdomains."""

    label: str
    domains: tuple[str, ...]
    """`huggingface.co` allows huggingface.co and every *.huggingface.co."""
    allowed_env: str | None = None
    """The variable that lists further endpoints the operator allows (None: none can be added)."""

    def covers(self, host: str) -> bool:
        return any(host == domain or host.endswith("." + domain) for domain in self.domains)

    def describe(self) -> str:
        return ", ".join(f"{d}, *.{d}" for d in self.domains)


_HF_HOSTS = KeyHosts(
    "Hugging Face",
    # huggingface_hub's own endpoints: huggingface.co (Hub), router. and api-inference.huggingface.co
    # (inference), *.endpoints.huggingface.cloud (dedicated Inference Endpoints).
    ("huggingface.co", "endpoints.huggingface.cloud"),
    HF_ALLOWED_ENDPOINTS_ENV,
)

KEY_HOSTS: dict[str, KeyHosts] = {
    "fal-qwen": KeyHosts("fal", ("fal.run", "fal.ai")),
    "ideogram": KeyHosts("Ideogram", ("ideogram.ai",)),
    "huggingface": _HF_HOSTS,
    "qwen": _HF_HOSTS,
}


def looks_like_url(value: str) -> bool:
    """Whether a free-text value is meant as a URL (and so may receive a key)."""
    return "://" in value or value.strip().lower().startswith(("http:", "https:"))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse(url: str) -> tuple[SplitResult, str] | str:
    """(parts, lower-case host) of an http(s) URL fit to receive a key, or the reason it is not."""
    if not url.isascii() or any(c.isspace() or c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "it contains spaces, backslashes, control or non-ASCII characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        return f"it is not a valid URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return "only http(s) URLs are allowed"
    host = (parts.hostname or "").lower()
    if not host:
        return "it has no host name"
    if "@" in parts.netloc:
        return "it carries a user name or password (user@host)"
    if any(unquote(segment) in (".", "..") for segment in parts.path.split("/")):
        return "its path contains . or .. segments"
    return parts, host


def _port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme.lower() == "https" else 80)


def _under(parts: SplitResult, host: str, prefix: str) -> bool:
    """Whether the URL lies under the allowed `prefix`: same scheme, host and port, path at a segment boundary."""
    parsed = _parse(prefix.strip())
    if isinstance(parsed, str):
        return False
    allowed, allowed_host = parsed
    if (allowed.scheme.lower(), allowed_host, _port(allowed)) != (parts.scheme.lower(), host, _port(parts)):
        return False
    base = allowed.path.rstrip("/")
    return not base or parts.path == base or parts.path.startswith(base + "/")


def allowed_endpoints(provider_id: str) -> list[str]:
    """The endpoint URL prefixes the operator allowed for this provider's key in the environment."""
    hosts = KEY_HOSTS.get(provider_id)
    entries: list[str] = []
    if hosts is not None and hosts.allowed_env:
        entries.extend(e.strip() for e in os.environ.get(hosts.allowed_env, "").split(",") if e.strip())
    emulator = os.environ.get(EMULATOR_URL_ENV, "").strip()
    if emulator:
        entries.append(emulator)
    return entries


def key_destination_problem(
    provider_id: str, url: str, *, also_allowed: Sequence[str] = (), allow_loopback: bool = False
) -> str | None:
    """Why `provider_id`'s key must not be sent to `url`, or None when it may be.

    Allowed: https to the provider's own hosts (KEY_HOSTS); a URL under a prefix the operator allowed in the
    environment (`allowed_endpoints`) or under `also_allowed` (an adapter's configured base URL); with
    `allow_loopback` (an adapter in emulator mode, whose key is the emulator's), any loopback URL. Plain http
    only ever goes to a loopback address: anything else would send the key readable on the wire."""
    hosts = KEY_HOSTS.get(provider_id)
    spec = PROVIDERS.get(provider_id)
    names = " or ".join("+".join(alt) for alt in spec.key_env_vars) if spec and spec.key_env_vars else "none"
    label = f"{hosts.label if hosts else provider_id} key ({names})"
    env = hosts.allowed_env if hosts else None
    how = (
        f"to allow an endpoint of your own, add its URL prefix to {env} (comma-separated; https, or http only "
        "on a loopback address)"
        if env
        else "no other URL may receive it"
    )
    parsed = _parse(url)
    if isinstance(parsed, str):
        return f"{_cut(url)} cannot receive the {label}: {parsed}"
    parts, host = parsed
    loopback = _is_loopback(host)
    if parts.scheme.lower() == "http" and not loopback:
        return (
            f"{_cut(url)} is plain http: the {label} would cross the network unencrypted; use https "
            "(plain http is allowed only to a loopback address, for the emulator)"
        )
    if hosts is not None and parts.scheme.lower() == "https" and hosts.covers(host):
        return None
    if allow_loopback and loopback:
        return None
    if any(_under(parts, host, prefix) for prefix in (*allowed_endpoints(provider_id), *also_allowed)):
        return None
    own = f"{hosts.label}'s hosts ({hosts.describe()})" if hosts else f"{provider_id}'s own hosts"
    return f"{_cut(url)} is not one of {own} and would receive the {label}; {how}"


def _cut(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[: limit - 1] + "…"
