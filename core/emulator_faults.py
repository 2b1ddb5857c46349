"""The console's fault controls: read and set the local emulator's per-provider faults (`/_emulator/...`).

Only in emulator mode (`IMAGEGATE_EMULATOR_URL`, a loopback URL the registry already trusts): an admin makes a
provider fail on purpose and watches routing fall back and its breaker open, without touching a real provider.
The sandbox has no fault hook (it never fails), so there is nothing to inject there.

Injecting and clearing are ADMIN or HERO (core.authz) and audited as `emulator.fault` (the emulator itself keeps
no history). The emulator names its providers by mount (`fal`, `ideogram`, `hf`, `qwen`); this module speaks
the product's ids and maps them through `registry.EMULATOR_MOUNTS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy.orm import Session

from common.errors import InvalidInput
from core import audit
from core.authz import authorize
from core.providers.registry import EMULATOR_MOUNTS, emulator_url
from core.security import SETTINGS_EDITORS, Actor

__all__ = ["EmulatorFaults", "emulator_name", "inject_fault", "read_faults"]

TIMEOUT_S = 3.0


@dataclass(frozen=True)
class EmulatorFaults:
    """One provider's fault board in the emulator."""

    provider: str
    """The product's id (fal-qwen, ideogram, huggingface, qwen)."""
    fault: str | None
    remaining: int | None
    """Requests the fault still applies to; None = until cleared."""
    supported: tuple[str, ...]


def emulator_name(provider: str) -> str:
    """The emulator's name for a product provider id; InvalidInput for one it does not emulate (the sandbox)."""
    mount = EMULATOR_MOUNTS.get(provider)
    if mount is None:
        message = f"{provider} has no emulator: only {', '.join(EMULATOR_MOUNTS)} can be made to fail"
        raise InvalidInput(message, {"provider": message})
    return mount.strip("/")


def _base() -> str:
    url = emulator_url()
    if url is None:
        message = (
            "fault injection needs the emulator: start `imagegate emulator` and set IMAGEGATE_EMULATOR_URL for the "
            "console (the sandbox never fails, so it has nothing to inject)"
        )
        raise InvalidInput(message, {"emulator": message})
    return url


def _call(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    base = _base()
    try:
        response = httpx.request(method, f"{base}/_emulator{path}", json=body, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        message = f"the emulator at {base} did not answer ({type(exc).__name__}): is `imagegate emulator` running?"
        raise InvalidInput(message, {"emulator": message}) from None
    payload = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code == 400:
        message = str(payload.get("error", "the emulator refused the change"))
        raise InvalidInput(message, {str(payload.get("field", "fault")): message})
    if response.status_code != 200 or not isinstance(payload, dict):
        message = f"the emulator at {base} answered HTTP {response.status_code}"
        raise InvalidInput(message, {"emulator": message})
    return payload


def _parse(payload: dict[str, Any]) -> dict[str, EmulatorFaults]:
    boards = payload.get("providers", {})
    out: dict[str, EmulatorFaults] = {}
    for provider in EMULATOR_MOUNTS:
        board = boards.get(emulator_name(provider), {})
        count = board.get("fault_count")
        out[provider] = EmulatorFaults(
            provider=provider,
            fault=board.get("fault"),
            remaining=int(count) if isinstance(count, int) else None,
            supported=tuple(board.get("supported_faults", ())),
        )
    return out


def read_faults() -> dict[str, EmulatorFaults]:
    """Every emulated provider's current fault (InvalidInput when there is no emulator or it does not answer)."""
    return _parse(_call("GET", "/state"))


def inject_fault(
    session: Session, actor: Actor, provider: str, fault: str | None, count: int | None = None
) -> EmulatorFaults:
    """Make the emulator fail `provider`'s next `count` requests (None: until cleared) with `fault`; `fault`
    None clears it. ADMIN or HERO; audited as `emulator.fault`."""
    who = authorize(session, actor, *SETTINGS_EDITORS, action="inject emulator faults")
    name = emulator_name(provider)
    body: dict[str, Any] = {"provider": name, "fault": fault}
    if fault is not None and count is not None:
        body["count"] = count
    before = read_faults()[provider]
    after = _parse(_call("POST", "/faults", body))[provider]
    audit.record(
        session,
        who,
        "emulator.fault",
        "provider",
        provider,
        before={"fault": before.fault, "remaining": before.remaining},
        after={"fault": after.fault, "remaining": after.remaining},
    )
    return after
