"""Which adapter serves each provider in this process, and how it connects (live, emulator or sandbox).

- A provider with a key runs LIVE against the real API.
- Without a key, it runs against the local emulator when `IMAGEGATE_EMULATOR_URL` is set (`imagegate emulator`
  prints it), so the real client library and wire protocol are exercised.
- Otherwise the offline sandbox renders in its place. The product never needs the internet to start, and every
  screen and result says which mode each provider is in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from core.catalog import PROVIDERS, ProviderKind, get_provider
from core.keys import key_status, provider_key
from core.providers.base import AdapterConfig, ConnectionMode, ProviderAdapter

EMULATOR_URL_ENV = "IMAGEGATE_EMULATOR_URL"
# The emulator accepts any key but a few fault-injection spellings; this one is never a real credential.
EMULATOR_API_KEY = "imagegate-emulator-key"

# Where each provider's emulator is mounted in `imagegate emulator` (emulator/server.py).
EMULATOR_MOUNTS = {"fal-qwen": "/fal", "ideogram": "/ideogram", "huggingface": "/hf", "qwen": "/qwen/"}


@dataclass(frozen=True)
class ProviderConnection:
    provider: str
    mode: ConnectionMode
    reason: str
    base_url: str | None = None

    @property
    def is_offline(self) -> bool:
        return self.mode is not ConnectionMode.LIVE


def emulator_url() -> str | None:
    raw = os.environ.get(EMULATOR_URL_ENV, "").strip().rstrip("/")
    return raw or None


def connection_for(provider_id: str) -> ProviderConnection:
    spec = get_provider(provider_id)
    if spec.kind is ProviderKind.SANDBOX:
        return ProviderConnection(provider_id, ConnectionMode.SANDBOX, "the sandbox is always offline")
    status = key_status(spec)
    if status.configured:
        return ProviderConnection(provider_id, ConnectionMode.LIVE, f"key from {', '.join(status.env_vars)}")
    missing = " or ".join("+".join(alt) for alt in spec.key_env_vars)
    emu = emulator_url()
    if emu:
        return ProviderConnection(
            provider_id,
            ConnectionMode.EMULATOR,
            f"no {missing}; using the local emulator at {emu}",
            base_url=emu + EMULATOR_MOUNTS[provider_id],
        )
    return ProviderConnection(provider_id, ConnectionMode.SANDBOX, f"no {missing}; the offline sandbox stands in")


def all_connections() -> list[ProviderConnection]:
    return [connection_for(pid) for pid in PROVIDERS]


def default_spend_view() -> str:
    """The spend a page shows first: `simulated` while no provider is live (there is no live money to show, and
    the would-be cost of emulator and sandbox runs is what moves), else `live`."""
    return "simulated" if all(c.is_offline for c in all_connections()) else "live"


def build_adapter(provider_id: str, *, poll_interval_s: float = 0.5) -> ProviderAdapter:
    """The adapter for `provider_id` in its current connection mode."""
    conn = connection_for(provider_id)
    if conn.mode is ConnectionMode.SANDBOX:
        from core.providers.sandbox import SandboxAdapter

        return SandboxAdapter(
            AdapterConfig(mode=ConnectionMode.SANDBOX, extra={"stands_in_for": provider_id})
        )
    key = provider_key(provider_id) if conn.mode is ConnectionMode.LIVE else EMULATOR_API_KEY
    config = AdapterConfig(api_key=key, base_url=conn.base_url, mode=conn.mode, poll_interval_s=poll_interval_s)
    if provider_id == "fal-qwen":
        from core.providers.fal import FalQwenAdapter

        return FalQwenAdapter(config)
    if provider_id == "ideogram":
        from core.providers.ideogram import IdeogramAdapter

        return IdeogramAdapter(config)
    if provider_id == "huggingface":
        from core.providers.huggingface import HuggingFaceAdapter

        return HuggingFaceAdapter(config)
    if provider_id == "qwen":
        from core.providers.qwen_space import QwenSpaceAdapter

        return QwenSpaceAdapter(config)
    raise KeyError(f"no adapter for provider {provider_id!r}")
