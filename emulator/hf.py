"""A local stand-in for Hugging Face's text-to-image inference (what huggingface_hub.InferenceClient calls).

Routes, relative to wherever the app is mounted (/hf in `imagegate emulator`):
- `POST /models/{model_id}`: the hf-inference route for a Hub model id (InferenceClient is given this URL as
  `model`, and POSTs to exactly it);
- `POST /`: the same, as a dedicated endpoint URL (an Inference Endpoint / self-hosted server);
- `GET /api/models/{model_id}`: minimal Hub model info with `inferenceProviderMapping` (what
  `HfApi.model_info` reads), which the adapter's health probe uses: no inference, nothing billed;
- `GET /models/{model_id}` and `GET /`: the emulator's stand-in for an endpoint's cheap liveness answer.

Wire behaviour: JSON body `{"inputs": prompt, "parameters": {negative_prompt, height, width,
num_inference_steps, guidance_scale, seed, ...}}`; `Authorization: Bearer <token>` (missing, or `hf_bad`: 401);
the answer is raw PNG bytes at the requested size. Errors are `{"error": "..."}` bodies: 400 bad parameters,
402 out of credits (fault quota), 404 unknown model (fault image_404), 429 with `RateLimit`/`RateLimit-Policy`/
`Retry-After` headers (fault rate_limit, or more than `knobs.concurrency` requests in flight), 500, and 503
`{"error": "Model X is currently loading", "estimated_time": 20.0}` (fault loading, or a cold start:
`create_app(board, cold_start_s=...)` makes each model answer 503 for that long after its first request).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from emulator.faults import Fault, FaultBoard
from emulator.http_faults import DroppedResponse, hold_open, quiet_emulated_drops
from emulator.images import render_image

# The faults this emulator acts on (the control API refuses the others for it).
SUPPORTED_FAULTS: frozenset[Fault] = frozenset(
    {
        Fault.AUTH,
        Fault.VALIDATION,
        Fault.SAFETY,
        Fault.RATE_LIMIT,
        Fault.SERVER_ERROR,
        Fault.HANG,
        Fault.DROP,
        Fault.MALFORMED,
        Fault.IMAGE_404,
        Fault.NOT_AN_IMAGE,
        Fault.LOADING,
        Fault.QUOTA,
    }
)

PROVIDER = "hf"
BAD_TOKEN = "hf_bad"
DEFAULT_SIZE = 1024
MIN_SIDE, MAX_SIDE = 64, 2048
LOADING_ESTIMATE_S = 20.0
_BAD_CREDENTIALS = "Invalid credentials in Authorization header"


@dataclass
class HfSettings:
    cold_start_s: float = 0.0
    """Seconds each model 'loads' after its first request, answering 503 meanwhile. 0 = always warm."""


@dataclass
class _State:
    settings: HfSettings
    in_flight: int = 0
    warm_at: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def loading_for(self, model: str) -> float:
        """Seconds until `model` is warm (0 when it is)."""
        now = time.monotonic()
        with self.lock:
            warm_at = self.warm_at.setdefault(model, now + self.settings.cold_start_s)
        return max(0.0, warm_at - now)


class _BadParams(Exception):
    """The request's parameters are invalid: answered with a 400."""


@dataclass(frozen=True)
class _Params:
    prompt: str
    width: int
    height: int
    seed: int | None


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _unauthorized() -> JSONResponse:
    # The Hub sends the reason in a header as well; huggingface_hub reads it to tell auth from "not found".
    return _error(401, _BAD_CREDENTIALS, {"X-Error-Message": _BAD_CREDENTIALS})


def _token_ok(request: Request, *, required: bool) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if not header:
        return not required
    return scheme.lower() == "bearer" and bool(token) and token != BAD_TOKEN


def _rate_limit_headers(retry_after_s: int, limit: int) -> dict[str, str]:
    # IETF RateLimit headers as the Hub sends them; huggingface_hub puts the reset time in its message.
    return {
        "RateLimit": f'"api";r=0;t={retry_after_s}',
        "RateLimit-Policy": f'"fixed window";"api";q={limit};w=60',
        "Retry-After": str(retry_after_s),
    }


def _int(params: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadParams(f"parameters.{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise _BadParams(f"parameters.{name} must be between {low} and {high}, got {value}")
    return value


def _parse(body: Any) -> _Params:
    if not isinstance(body, dict):
        raise _BadParams("the body must be a JSON object with 'inputs'")
    prompt = body.get("inputs")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _BadParams("'inputs' must be a non-empty prompt string")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise _BadParams("'parameters' must be an object")
    width = _int(params, "width", MIN_SIDE, MAX_SIDE) or DEFAULT_SIZE
    height = _int(params, "height", MIN_SIDE, MAX_SIDE) or DEFAULT_SIZE
    if width % 8 or height % 8:
        raise _BadParams(f"width and height must be multiples of 8, got {width}x{height}")
    _int(params, "num_inference_steps", 1, 100)
    guidance = params.get("guidance_scale")
    if guidance is not None and (
        isinstance(guidance, bool) or not isinstance(guidance, int | float) or not 0 <= guidance <= 30
    ):
        raise _BadParams(f"parameters.guidance_scale must be a number between 0 and 30, got {guidance!r}")
    negative = params.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise _BadParams("parameters.negative_prompt must be a string")
    seed = _int(params, "seed", 0, 2**63 - 1)
    return _Params(prompt, width, height, seed)


def create_app(board: FaultBoard, *, cold_start_s: float = 0.0) -> Starlette:
    """The HF inference emulator. `app.state.hf.settings.cold_start_s` can be changed while it runs."""
    state = _State(HfSettings(cold_start_s=cold_start_s))
    quiet_emulated_drops()

    async def infer(request: Request) -> Response:
        model = str(request.path_params.get("model_id", "endpoint"))
        if not _token_ok(request, required=True):
            return _unauthorized()
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "the body is not valid JSON")
        prompt_text = body.get("inputs") if isinstance(body, dict) else None
        fault = board.take_fault(PROVIDER, prompt_text if isinstance(prompt_text, str) else "")
        knobs = board.get(PROVIDER)
        if fault is Fault.AUTH:
            return _unauthorized()
        if fault is Fault.IMAGE_404:
            return _error(404, f"Model {model} does not exist")
        try:
            params = _parse(body)
        except _BadParams as exc:
            return _error(400, str(exc))
        if fault is Fault.VALIDATION:
            return _error(400, "emulated validation failure: the parameters were rejected")
        if fault is Fault.SAFETY:
            return _error(400, "The prompt was flagged by the safety checker (NSFW content)")
        if fault is Fault.QUOTA:
            return _error(402, "You have exceeded your monthly included credits for Inference Providers.")
        if fault is Fault.RATE_LIMIT:
            return _error(
                429, "Rate limit reached", _rate_limit_headers(knobs.retry_after_s, knobs.concurrency)
            )
        if fault is Fault.SERVER_ERROR:
            return _error(500, "Internal Server Error")
        if fault is Fault.LOADING:
            return _error(503, f"Model {model} is currently loading", estimated_time=LOADING_ESTIMATE_S)
        remaining = state.loading_for(model)
        if remaining > 0:
            return _error(503, f"Model {model} is currently loading", estimated_time=round(remaining, 1))
        with state.lock:
            busy = state.in_flight >= knobs.concurrency
            if not busy:
                state.in_flight += 1
        if busy:
            return _error(
                429,
                f"Too many concurrent requests (limit {knobs.concurrency})",
                _rate_limit_headers(knobs.retry_after_s, knobs.concurrency),
            )
        try:
            if fault is Fault.HANG:
                await hold_open(request)
                return _error(504, "emulator: hung request released")
            if fault is Fault.DROP:
                return DroppedResponse("image/png", b"\x89PNG\r\n", 65536)
            await asyncio.sleep(knobs.latency_s)
            if fault is Fault.MALFORMED:
                return JSONResponse({"generated_text": "this is not an image"})
            if fault is Fault.NOT_AN_IMAGE:
                return Response(b"<html><body>upstream error</body></html>", media_type="image/png")
            seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
            png = await asyncio.to_thread(render_image, params.prompt, seed, params.width, params.height)
            return Response(png, media_type="image/png")
        finally:
            with state.lock:
                state.in_flight -= 1

    def _standing_fault() -> Response | None:
        """Health routes follow the provider's standing fault without using up a counted one."""
        knobs = board.get(PROVIDER)
        if knobs.fault is Fault.AUTH:
            return _unauthorized()
        if knobs.fault is Fault.SERVER_ERROR:
            return _error(500, "Internal Server Error")
        if knobs.fault is Fault.RATE_LIMIT:
            return _error(
                429, "Rate limit reached", _rate_limit_headers(knobs.retry_after_s, knobs.concurrency)
            )
        return None

    async def model_info(request: Request) -> Response:
        model = str(request.path_params["model_id"])
        if not _token_ok(request, required=False):
            return _unauthorized()
        if board.get(PROVIDER).fault is Fault.HANG:
            await hold_open(request)
            return _error(504, "emulator: hung request released")
        if (failure := _standing_fault()) is not None:
            return failure
        return JSONResponse(
            {
                "_id": model,
                "id": model,
                "modelId": model,
                "pipeline_tag": "text-to-image",
                "private": False,
                "inferenceProviderMapping": {
                    "hf-inference": {"status": "live", "providerId": model, "task": "text-to-image"}
                },
            }
        )

    async def endpoint_alive(request: Request) -> Response:
        if not _token_ok(request, required=True):
            return _unauthorized()
        if (failure := _standing_fault()) is not None:
            return failure
        model = str(request.path_params.get("model_id", "endpoint"))
        return JSONResponse({"model": model, "loaded": state.loading_for(model) == 0})

    app = Starlette(
        routes=[
            Route("/api/models/{model_id:path}", model_info, methods=["GET"]),
            Route("/models/{model_id:path}", infer, methods=["POST"]),
            Route("/models/{model_id:path}", endpoint_alive, methods=["GET"]),
            Route("/", infer, methods=["POST"]),
            Route("/", endpoint_alive, methods=["GET"]),
        ]
    )
    app.state.hf = state
    return app
