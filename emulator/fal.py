"""fal.ai's queue API for `fal-ai/qwen-image`, close enough on the wire for unmodified fal-client 1.0.3.

Paths are relative to where the app is mounted (`/fal` in emulator.server):

- `POST /fal-ai/qwen-image`                              submit; 200 with request_id + absolute URLs
- `POST /run/fal-ai/qwen-image`                          fal.run's synchronous endpoint: one POST, the output
- `GET  /fal-ai/qwen-image/requests/{id}/status?logs=..` IN_QUEUE (202) / IN_PROGRESS (202) / COMPLETED (200)
- `GET  /fal-ai/qwen-image/requests/{id}`               the model output, `x-fal-billable-units` header
- `PUT  /fal-ai/qwen-image/requests/{id}/cancel`        202 CANCELLATION_REQUESTED / 400 ALREADY_COMPLETED
- `GET  /files/{name}`                                    the generated images (fal's CDN stand-in)

A request moves on as it is polled: it answers IN_QUEUE for `queue_steps` status polls (or QUEUE_STEP_S seconds
per step if nobody polls), then waits for a free slot under `concurrency` (still IN_QUEUE, its position =
requests queued ahead of it), then runs for
`latency_s` (IN_PROGRESS with growing logs), then COMPLETED. Requests live in memory for the life of the
process, so a new client (or a restarted adapter) can collect one by id.

Faults (`[[fault:NAME]]` in the prompt, or the board's standing fault for "fal"), decided at submit:
auth 401 · validation 422 · rate_limit 429 + Retry-After · drop (connection closed mid-answer) at submit;
server_error (the runner fails: result 503, X-Fal-Error-Type) · hang (stays IN_PROGRESS forever) ·
malformed (result 200 with a truncated JSON body) · safety (images 0, 2, ... flagged and blanked, when the
safety checker is on) · image_404 · not_an_image after the queue. Keys starting with "invalid" get a 401.
A `drop` at submit queues the job first and then loses the answer, as when a connection breaks after fal got
the request. The job itself runs fine under status_error (status polls answer 503 while it runs) and
status_drop (they lose their connection while it runs); result_drop loses every fetch of the result.
cancelled_499 / cancelled_400: once the job is cancelled, its status says a plain COMPLETED and its result
answers 499, or 400 "Request was cancelled" without an error type (the other ways fal reports a cancellation).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from emulator.api_facts import (
    FAL_ACCELERATIONS,
    FAL_DEFAULT_GUIDANCE,
    FAL_DEFAULT_IMAGE_SIZE,
    FAL_DEFAULT_NEGATIVE_PROMPT,
    FAL_DEFAULT_STEPS,
    FAL_GUIDANCE,
    FAL_IMAGE_SIZE_PRESETS,
    FAL_LORA_SCALE,
    FAL_MAX_LORAS,
    FAL_MAX_SIDE,
    FAL_NUM_IMAGES,
    FAL_OUTPUT_FORMATS,
    FAL_STEPS,
)
from emulator.faults import BOARD, Fault, FaultBoard
from emulator.http_faults import HANG_LIMIT_S, DroppedResponse, quiet_emulated_drops
from emulator.images import render_image

PROVIDER = "fal"
APPS = ("fal-ai/qwen-image",)
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
        Fault.STATUS_ERROR,
        Fault.STATUS_DROP,
        Fault.RESULT_DROP,
        Fault.CANCELLED_499,
        Fault.CANCELLED_400,
    }
)
MAX_SIDE = FAL_MAX_SIDE
QUEUE_STEP_S = 0.5
"""A queued request also moves on one step per this many seconds, polled or not: an abandoned request must
run (and leave the queue) like on fal, not hold everyone's position forever."""
SYNC_POLL_S = 0.005
"""How often the synchronous endpoint looks whether its job finished."""
MAX_FILES = 512
"""Generated files kept for download; older ones are dropped (fal's CDN URLs expire too)."""

class ImageSize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(gt=0, le=MAX_SIDE)
    height: int = Field(gt=0, le=MAX_SIDE)


class LoraWeight(BaseModel):
    path: str = Field(min_length=1)
    scale: float = Field(1.0, ge=FAL_LORA_SCALE[0], le=FAL_LORA_SCALE[1])


def _one_of(value: str, choices: Iterable[str]) -> str:
    allowed = tuple(choices)
    if value not in allowed:
        raise ValueError(f"Input should be {' or '.join(repr(c) for c in allowed)}")
    return value


class QwenImageInput(BaseModel):
    """fal-ai/qwen-image's input schema (fal ignores unknown fields, so does this); limits from api_facts."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    image_size: str | ImageSize = FAL_DEFAULT_IMAGE_SIZE
    num_inference_steps: int = Field(FAL_DEFAULT_STEPS, ge=FAL_STEPS[0], le=FAL_STEPS[1])
    guidance_scale: float = Field(FAL_DEFAULT_GUIDANCE, ge=FAL_GUIDANCE[0], le=FAL_GUIDANCE[1])
    num_images: int = Field(1, ge=FAL_NUM_IMAGES[0], le=FAL_NUM_IMAGES[1])
    seed: int | None = Field(None, ge=0)
    negative_prompt: str = FAL_DEFAULT_NEGATIVE_PROMPT
    acceleration: str = FAL_ACCELERATIONS[0]
    enable_safety_checker: bool = True
    output_format: str = "png"
    sync_mode: bool = False
    loras: list[LoraWeight] = Field(default_factory=list, max_length=FAL_MAX_LORAS)
    use_turbo: bool = False

    @field_validator("image_size")
    @classmethod
    def _preset(cls, value: str | ImageSize) -> str | ImageSize:
        return _one_of(value, FAL_IMAGE_SIZE_PRESETS) if isinstance(value, str) else value

    @field_validator("acceleration")
    @classmethod
    def _acceleration(cls, value: str) -> str:
        return _one_of(value, FAL_ACCELERATIONS)

    @field_validator("output_format")
    @classmethod
    def _output_format(cls, value: str) -> str:
        return _one_of(value, FAL_OUTPUT_FORMATS)

    def dimensions(self) -> tuple[int, int]:
        if isinstance(self.image_size, ImageSize):
            return self.image_size.width, self.image_size.height
        return FAL_IMAGE_SIZE_PRESETS[self.image_size]


@dataclass
class FalRequest:
    id: str
    app: str
    input: QwenImageInput
    fault: Fault | None
    created: float
    start_deadline: float | None
    polls: int = 0
    state: Literal["queued", "running", "completed"] = "queued"
    started: float | None = None
    finished: float | None = None
    cancelled: bool = False
    timed_out: bool = False
    output: dict[str, Any] | None = None
    billable_units: Decimal = Decimal(0)
    logs: list[dict[str, str]] = field(default_factory=list)


def _detail(loc: list[str | int], msg: str, type_: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": type_}


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


class FalEmulator:
    """The in-memory queue. One per app instance; thread-safe because tests poke it from other threads."""

    def __init__(self, board: FaultBoard) -> None:
        self.board = board
        self.requests: OrderedDict[str, FalRequest] = OrderedDict()
        self.files: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    # -- queue mechanics -------------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Finish what has run long enough, then start eligible queued requests, oldest first."""
        knobs = self.board.get(PROVIDER)
        running = 0
        for req in self.requests.values():
            if req.state == "running" and req.started is not None:
                if req.fault is not Fault.HANG and now - req.started >= knobs.latency_s:
                    self._complete(req, now)
                else:
                    running += 1
        for req in self.requests.values():
            if req.state != "queued":
                continue
            if req.start_deadline is not None and now > req.start_deadline:
                req.timed_out = True
                req.state, req.finished = "completed", now
                continue
            if self._steps_done(req, now) >= knobs.queue_steps and running < knobs.concurrency:
                req.state, req.started = "running", now
                running += 1
                self._log(req, "INFO", "Runner acquired; loading Qwen-Image weights")

    def _log(self, req: FalRequest, level: str, message: str) -> None:
        req.logs.append({"message": message, "level": level, "source": "user", "timestamp": _now_iso()})

    def _running_logs(self, req: FalRequest, now: float) -> None:
        """One log line per fifth of the run, like a diffusion loop reporting its steps."""
        latency = max(self.board.get(PROVIDER).latency_s, 1e-6)
        steps = req.input.num_inference_steps
        started = req.started if req.started is not None else now
        fraction = min(1.0, (now - started) / latency) if req.fault is not Fault.HANG else 0.0
        want = 1 + int(fraction * 5)
        while len(req.logs) < want:
            done = round(steps * (len(req.logs)) / 5)
            self._log(req, "INFO", f"Denoising step {done}/{steps}")

    def _complete(self, req: FalRequest, now: float) -> None:
        req.state, req.finished = "completed", now
        if req.fault is Fault.SERVER_ERROR:
            self._log(req, "ERROR", "Runner crashed while generating")
            return
        inp = req.input
        width, height = req.input.dimensions()
        seed = inp.seed if inp.seed is not None else random.randint(0, 2**31 - 1)
        fmt = inp.output_format
        content_type = f"image/{fmt}"
        flagged = [
            req.fault is Fault.SAFETY and inp.enable_safety_checker and i % 2 == 0 for i in range(inp.num_images)
        ]
        images = []
        for i in range(inp.num_images):
            # fal blanks what its safety checker flags: a black image of the requested size.
            data = _black(width, height, fmt) if flagged[i] else render_image(inp.prompt, seed + i, width, height, fmt)
            if req.fault is Fault.NOT_AN_IMAGE:
                data = b"<html><body>502 Bad Gateway</body></html>"
            if inp.sync_mode and req.fault is not Fault.IMAGE_404:
                url = f"data:{content_type};base64," + base64.b64encode(data).decode()
            else:
                name = f"{req.id}-{i}.{'jpg' if fmt == 'jpeg' else 'png'}"
                if req.fault is not Fault.IMAGE_404:
                    self._store_file(name, data, content_type)
                url = f"files/{name}"  # made absolute when served
            images.append({"url": url, "width": width, "height": height, "content_type": content_type})
        self._log(req, "INFO", f"Generated {inp.num_images} image(s) in {now - (req.started or now):.2f}s")
        req.billable_units = Decimal(width * height * inp.num_images) / Decimal(1_000_000)
        req.output = {
            "images": images,
            "timings": {"inference": round(now - (req.started or now), 3)},
            "seed": seed,
            "has_nsfw_concepts": flagged,
            "prompt": inp.prompt,
        }

    def _store_file(self, name: str, data: bytes, content_type: str) -> None:
        self.files[name] = (data, content_type)
        while len(self.files) > MAX_FILES:
            self.files.popitem(last=False)

    @staticmethod
    def _steps_done(req: FalRequest, now: float) -> int:
        return max(req.polls, int((now - req.created) / QUEUE_STEP_S))

    def queue_position(self, req: FalRequest, now: float) -> int:
        ahead = 0
        for other in self.requests.values():
            if other is req:
                break
            if other.state == "queued":
                ahead += 1
        remaining_steps = max(0, self.board.get(PROVIDER).queue_steps - self._steps_done(req, now))
        return ahead + remaining_steps

    # -- HTTP --------------------------------------------------------------------------------------------

    @staticmethod
    def _auth_error(request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme != "Key" or not token.strip():
            return JSONResponse({"detail": "Missing or malformed Authorization header (want 'Key <FAL_KEY>')"}, 401)
        if token.startswith("invalid"):
            return JSONResponse({"detail": "Invalid API key"}, 401)
        return None

    @staticmethod
    def _base(request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}{request.scope.get('root_path', '')}"

    def _find(self, request: Request) -> tuple[FalRequest, float] | Response:
        """Check the key, find the request by id, and advance the queue to now. The caller holds the lock."""
        if (denied := self._auth_error(request)) is not None:
            return denied
        app = f"{request.path_params['owner']}/{request.path_params['alias']}"
        req = self.requests.get(request.path_params["request_id"])
        if req is None or req.app != app:
            return JSONResponse({"detail": f"Request {request.path_params['request_id']!r} not found"}, 404)
        now = time.monotonic()
        self._advance(now)
        return req, now

    async def submit(self, request: Request) -> Response:
        app = f"{request.path_params['owner']}/{request.path_params['alias']}"
        if app not in APPS:
            return JSONResponse({"detail": f"Application {app!r} not found"}, 404)
        if (denied := self._auth_error(request)) is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"detail": [_detail(["body"], "Request body is not valid JSON", "json_invalid")]}, 422)
        if not isinstance(body, dict):
            return JSONResponse({"detail": [_detail(["body"], "Input should be an object", "dict_type")]}, 422)
        try:
            inp = QwenImageInput.model_validate(body)
        except ValidationError as exc:
            detail = [_detail(["body", *e["loc"]], e["msg"], e["type"]) for e in exc.errors()]
            return JSONResponse({"detail": detail}, 422)

        fault = self.board.take_fault(PROVIDER, inp.prompt)
        if fault is not None and fault not in SUPPORTED_FAULTS:
            fault = None
        knobs = self.board.get(PROVIDER)
        if fault is Fault.AUTH:
            return JSONResponse({"detail": "Invalid API key"}, 401)
        if fault is Fault.VALIDATION:
            msg = "Prompt rejected by input validation (emulated fault)"
            return JSONResponse({"detail": [_detail(["body", "prompt"], msg, "value_error")]}, 422)
        if fault is Fault.RATE_LIMIT:
            return JSONResponse(
                {"detail": "Too many concurrent requests for this account"},
                429,
                headers={"Retry-After": str(knobs.retry_after_s)},
            )
        timeout_header = request.headers.get("x-fal-request-timeout")
        now = time.monotonic()
        start_deadline = None
        if timeout_header:
            try:
                start_deadline = now + float(timeout_header)
            except ValueError:
                return JSONResponse({"detail": "X-Fal-Request-Timeout must be a number of seconds"}, 400)
        request_id = str(uuid.uuid4())
        with self._lock:
            req = FalRequest(request_id, app, inp, fault, now, start_deadline)
            self.requests[request_id] = req
            self._log(req, "INFO", "Request queued")
            self._advance(now)
            position = self.queue_position(req, now)
        if fault is Fault.DROP:
            return DroppedResponse("application/json", b'{"request_id": "', 512)
        base = f"{self._base(request)}/{app}/requests/{request_id}"
        return JSONResponse(
            {
                "status": "IN_QUEUE",
                "request_id": request_id,
                "response_url": base,
                "status_url": f"{base}/status",
                "cancel_url": f"{base}/cancel",
                "queue_position": position,
            },
            headers={"x-fal-request-id": request_id},
        )

    async def status(self, request: Request) -> Response:
        with self._lock:
            found = self._find(request)
            if isinstance(found, Response):
                return found
            req, now = found
            with_logs = request.query_params.get("logs", "false").lower() in ("1", "true")
            headers = {"x-fal-request-id": req.id}
            if req.state == "queued":
                req.polls += 1
                body: dict[str, Any] = {"status": "IN_QUEUE", "queue_position": self.queue_position(req, now)}
                return JSONResponse(body, 202, headers=headers)
            if req.state == "running":
                if req.fault is Fault.STATUS_ERROR:
                    return JSONResponse({"detail": "Service temporarily unavailable"}, 503)
                if req.fault is Fault.STATUS_DROP:
                    return DroppedResponse("application/json", b'{"status": "IN_PROG', 512)
                self._running_logs(req, now)
                body = {"status": "IN_PROGRESS", "logs": list(req.logs) if with_logs else None}
                return JSONResponse(body, 202, headers=headers)
            body = {
                "status": "COMPLETED",
                "logs": list(req.logs) if with_logs else None,
                "metrics": {"inference_time": round((req.finished or now) - (req.started or now), 3)}
                if req.started is not None
                else {},
            }
            if req.cancelled and req.fault not in (Fault.CANCELLED_499, Fault.CANCELLED_400):
                body["error"], body["error_type"] = "Request was cancelled", "request_cancelled"
            elif req.timed_out:
                body["error"], body["error_type"] = "Request timed out before it started", "request_timeout"
            elif req.fault is Fault.SERVER_ERROR:
                body["error"], body["error_type"] = "Runner failed while processing", "runner_server_error"
            return JSONResponse(body, 200, headers=headers)

    async def result(self, request: Request) -> Response:
        with self._lock:
            found = self._find(request)
            if isinstance(found, Response):
                return found
            req, _ = found
            headers = {"x-fal-request-id": req.id}
            if req.state != "completed":
                return JSONResponse({"detail": "Request is still in progress"}, 400, headers=headers)
            if req.cancelled:
                if req.fault is Fault.CANCELLED_499:
                    return JSONResponse({"detail": "Request was cancelled"}, 499, headers=headers)
                if req.fault is Fault.CANCELLED_400:
                    return JSONResponse({"detail": "Request was cancelled"}, 400, headers=headers)
                return JSONResponse(
                    {"detail": "Request was cancelled", "error_type": "request_cancelled"}, 400, headers=headers
                )
            if req.fault is Fault.RESULT_DROP:
                return DroppedResponse("application/json", b'{"images": [{"url": "', 512)
            if req.timed_out:
                return JSONResponse(
                    {"detail": "Request timed out before it started", "error_type": "request_timeout"},
                    504,
                    headers={**headers, "X-Fal-Request-Timeout-Type": "user"},
                )
            if req.fault is Fault.SERVER_ERROR or req.output is None:
                return JSONResponse(
                    {"detail": "Internal error in the runner"},
                    503,
                    headers={**headers, "X-Fal-Error-Type": "runner_server_error"},
                )
            if req.fault is Fault.MALFORMED:
                return Response(b'{"images": [{"url": "', 200, media_type="application/json", headers=headers)
            output = dict(req.output)
            base = self._base(request)
            output["images"] = [
                {**img, "url": img["url"] if img["url"].startswith("data:") else f"{base}/{img['url']}"}
                for img in req.output["images"]
            ]
            headers["x-fal-billable-units"] = format(req.billable_units.normalize(), "f")
            if req.input.sync_mode:
                # sync_mode keeps no request history: the answer can be read once.
                self.requests.pop(req.id, None)
            return JSONResponse(output, 200, headers=headers)

    async def run_sync(self, request: Request) -> Response:
        """fal.run's synchronous endpoint (`POST https://fal.run/{app}`, what LiteLLM calls): one POST answered
        with the output. The job goes through the same queue (latency, concurrency, faults) as a submit."""
        submitted = await self.submit(request)
        if isinstance(submitted, DroppedResponse) or submitted.status_code != 200:
            return submitted
        request_id = json.loads(bytes(submitted.body))["request_id"]
        deadline = time.monotonic() + HANG_LIMIT_S
        while True:
            with self._lock:
                req = self.requests[request_id]
                req.polls += 1
                self._advance(time.monotonic())
                if req.state == "completed":
                    break
                # Sleep until the job is due (not a busy poll: a thousand jobs may be waiting at once).
                due = (req.started or 0.0) + self.board.get(PROVIDER).latency_s - time.monotonic()
            if time.monotonic() > deadline or await request.is_disconnected():
                return JSONResponse({"detail": "Request timed out"}, 504)
            await asyncio.sleep(max(SYNC_POLL_S, due) if req.state == "running" else SYNC_POLL_S)
        scope = {**request.scope, "path_params": {**request.path_params, "request_id": request_id}}
        return await self.result(Request(scope, request.receive))

    async def cancel(self, request: Request) -> Response:
        with self._lock:
            found = self._find(request)
            if isinstance(found, Response):
                return found
            req, now = found
            if req.state == "completed":
                return JSONResponse({"status": "ALREADY_COMPLETED"}, 400)
            req.cancelled = True
            req.state, req.finished = "completed", now
            self._log(req, "WARNING", "Request cancelled by the user")
            return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202)

    async def file(self, request: Request) -> Response:
        with self._lock:
            found = self.files.get(request.path_params["name"])
        if found is None:
            return JSONResponse({"detail": "File not found"}, 404)
        data, content_type = found
        return Response(data, media_type=content_type)

    async def index(self, request: Request) -> Response:
        return JSONResponse({"emulator": "fal queue API", "apps": list(APPS), "requests": len(self.requests)})


def _black(width: int, height: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format={"png": "PNG", "jpeg": "JPEG"}[fmt])
    return out.getvalue()


def create_app(board: FaultBoard = BOARD) -> Starlette:
    emu = FalEmulator(board)
    quiet_emulated_drops()
    app = Starlette(
        routes=[
            Route("/", emu.index, methods=["GET"]),
            Route("/files/{name}", emu.file, methods=["GET"]),
            Route("/run/{owner}/{alias}", emu.run_sync, methods=["POST"]),
            Route("/{owner}/{alias}", emu.submit, methods=["POST"]),
            Route("/{owner}/{alias}/requests/{request_id}/status", emu.status, methods=["GET"]),
            Route("/{owner}/{alias}/requests/{request_id}", emu.result, methods=["GET"]),
            Route("/{owner}/{alias}/requests/{request_id}/cancel", emu.cancel, methods=["PUT"]),
        ]
    )
    app.state.emulator = emu
    return app
