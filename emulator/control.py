"""The emulator's control API (`/_emulator/...`): read and change the fault board over HTTP.

Every change is validated before anything is touched: an unknown provider, fault or knob, or a value of the
wrong type or range, gets a 400 whose JSON says which field and why, and the board stays as it was.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from emulator.faults import PROVIDERS, Fault, FaultBoard

# name -> (type, minimum, maximum). Ranges keep a typo (latency 3000 s) from wedging a test run.
KNOBS: dict[str, tuple[type[int] | type[float], float, float]] = {
    "latency_s": (float, 0.0, 600.0),
    "queue_steps": (int, 0, 1000),
    "concurrency": (int, 1, 10_000),
    "retry_after_s": (int, 0, 86_400),
}

SupportedFaults = Callable[[str], frozenset[Fault] | None]


class ControlError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _error(exc: ControlError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "field": exc.field}, 400)


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise ControlError("body", f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ControlError("body", "request body must be a JSON object")
    return body


def _provider(body: Mapping[str, Any]) -> str:
    provider = body.get("provider")
    if provider not in PROVIDERS:
        raise ControlError("provider", f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
    return str(provider)


def _number(name: str, value: Any, kind: type[int] | type[float], lo: float, hi: float) -> int | float:
    # bool is an int in Python; `true` for a latency is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ControlError(name, f"{name} must be a number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise ControlError(name, f"{name} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise ControlError(name, f"{name} must be between {lo:g} and {hi:g}, got {value!r}")
    return kind(value)


def routes(board: FaultBoard, supported_faults: SupportedFaults, mounted: Callable[[], dict[str, str]]) -> list[Route]:
    """The control routes for `board`. `supported_faults(provider)` narrows faults per provider (None = all)."""

    def state_payload() -> dict[str, Any]:
        mounts = mounted()
        snapshot = board.snapshot()
        out: dict[str, Any] = {}
        for provider in PROVIDERS:
            allowed = supported_faults(provider)
            faults = sorted(f.value for f in (allowed if allowed is not None else set(Fault)))
            out[provider] = {
                **snapshot.get(provider, {}),
                "mounted_at": mounts.get(provider),
                "supported_faults": faults,
            }
        return {"providers": out, "knobs": {k: {"min": v[1], "max": v[2]} for k, v in KNOBS.items()}}

    async def state(request: Request) -> Response:
        return JSONResponse(state_payload())

    async def faults(request: Request) -> Response:
        try:
            body = await _json_object(request)
            unknown = set(body) - {"provider", "fault", "count"}
            if unknown:
                raise ControlError(sorted(unknown)[0], f"unknown field(s): {', '.join(sorted(unknown))}")
            provider = _provider(body)
            raw_fault = body.get("fault")
            fault: Fault | None = None
            if raw_fault is not None:
                try:
                    fault = Fault(raw_fault)
                except ValueError:
                    known = ", ".join(f.value for f in Fault)
                    raise ControlError("fault", f"unknown fault {raw_fault!r}; known: {known}") from None
                allowed = supported_faults(provider)
                if allowed is not None and fault not in allowed:
                    names = ", ".join(sorted(f.value for f in allowed))
                    raise ControlError("fault", f"fault {fault.value!r} does not apply to {provider}; it has: {names}")
            count = body.get("count")
            if count is not None:
                count = int(_number("count", count, int, 1, 1_000_000))
            if fault is None and count is not None:
                raise ControlError("count", "count only makes sense with a fault")
        except ControlError as exc:
            return _error(exc)
        board.set_fault(provider, fault, count)
        return JSONResponse(state_payload())

    async def config(request: Request) -> Response:
        try:
            body = await _json_object(request)
            provider = _provider(body)
            values: dict[str, int | float] = {}
            for name, value in body.items():
                if name == "provider":
                    continue
                if name not in KNOBS:
                    raise ControlError(name, f"unknown knob {name!r}; known: {', '.join(KNOBS)}")
                kind, lo, hi = KNOBS[name]
                values[name] = _number(name, value, kind, lo, hi)
            if not values:
                raise ControlError("body", f"nothing to change: give at least one of {', '.join(KNOBS)}")
        except ControlError as exc:
            return _error(exc)
        board.configure(provider, **values)
        return JSONResponse(state_payload())

    async def reset(request: Request) -> Response:
        board.reset()
        return JSONResponse(state_payload())

    return [
        Route("/state", state, methods=["GET"]),
        Route("/faults", faults, methods=["POST"]),
        Route("/config", config, methods=["POST"]),
        Route("/reset", reset, methods=["POST"]),
    ]
