"""A local stand-in for Ideogram's 3.0 REST API: `POST /v1/ideogram-v3/generate`.

It speaks the wire protocol the real API speaks (emulator.api_facts, from shared/reference/providers.md),
strictly enough that an adapter bug shows up here rather than in production:
- multipart/form-data only (a url-encoded or JSON body gets 415), `Api-Key` header required (401 when missing,
  or when it is the literal `bad-key`);
- synchronous: the answer holds the images, as signed URLs that EXPIRE (`?expires=<unix>&sig=<hmac>`; a late or
  tampered URL gets 403, an unknown one 404), serving real PNGs (emulator.images.render_image);
- errors in both body shapes Ideogram uses: RFC 7807 problem+json for validation (400) and safety (422), and
  `{"error": "..."}` for auth (401), content type (415), rate limits (429), server errors (5xx) and the
  resolution-and-aspect-ratio conflict (400), so a client must read both;
- at most `knobs.concurrency` requests in flight (429 with Retry-After beyond that).

Faults come from the FaultBoard (a `[[fault:NAME]]` marker in the prompt, or the provider's standing fault).
Emulator-only prompt convention: `[[unsafe:K]]` marks the first K images of the answer unsafe
(`is_image_safe: false`, empty url), as Ideogram does per image; K >= num_images makes every image unsafe.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from emulator.api_facts import (
    IDEOGRAM_ASPECT_RATIOS,
    IDEOGRAM_DEFAULT_ASPECT_RATIO,
    IDEOGRAM_MAGIC_PROMPT,
    IDEOGRAM_NUM_IMAGES,
    IDEOGRAM_RENDERING_SPEEDS,
    IDEOGRAM_RESOLUTIONS,
    IDEOGRAM_SEED,
    IDEOGRAM_STYLE_TYPES,
    ideogram_size_for,
)
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
    }
)

PROVIDER = "ideogram"
GENERATE_PATH = "/v1/ideogram-v3/generate"
BAD_KEY = "bad-key"

SEED_MAX = IDEOGRAM_SEED[1]
RENDERING_SPEEDS = IDEOGRAM_RENDERING_SPEEDS
MAGIC_PROMPT = IDEOGRAM_MAGIC_PROMPT
STYLE_TYPES = IDEOGRAM_STYLE_TYPES
# Wire spelling of aspect ratios: "16x9", not "16:9"; each rendered at api_facts.ideogram_size_for's choice.
WIRE_ASPECT_RATIOS: dict[str, tuple[int, int]] = {ratio: ideogram_size_for(ratio) for ratio in IDEOGRAM_ASPECT_RATIOS}
WIRE_RESOLUTIONS = IDEOGRAM_RESOLUTIONS
KNOWN_FIELDS = frozenset(
    {
        "prompt",
        "seed",
        "resolution",
        "aspect_ratio",
        "rendering_speed",
        "magic_prompt",
        "negative_prompt",
        "num_images",
        "style_type",
    }
)
_UNSAFE_MARKER = re.compile(r"\[\[unsafe:(\d{1,2})\]\]")
# A hung request gives up on its own after this long, so a test that forgets its client timeout still ends.
_MAX_IMAGES_KEPT = 2048

ImageKind = Literal["ok", "missing", "garbage"]


@dataclass
class IdeogramSettings:
    url_ttl_s: float = 3600.0
    """How long an image URL stays valid; tests shorten it to show that a late download fails."""
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))


@dataclass(frozen=True)
class _ImageJob:
    prompt: str
    seed: int
    width: int
    height: int
    kind: ImageKind


@dataclass
class _State:
    settings: IdeogramSettings
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Bounded: the oldest entries fall out, which a client sees as an expired link (404), like the real CDN.
    images: OrderedDict[str, _ImageJob] = field(default_factory=OrderedDict)

    def remember(self, job: _ImageJob) -> str:
        image_id = uuid.uuid4().hex
        with self.lock:
            self.images[image_id] = job
            while len(self.images) > _MAX_IMAGES_KEPT:
                self.images.popitem(last=False)
        return image_id

    def recall(self, image_id: str) -> _ImageJob | None:
        with self.lock:
            return self.images.get(image_id)


class _Invalid(Exception):
    def __init__(self, detail: str, *, problem: bool = True) -> None:
        super().__init__(detail)
        self.detail = detail
        self.problem = problem


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _problem(status: int, title: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"type": "about:blank", "title": title, "detail": detail, "status": status},
        status_code=status,
        media_type="application/problem+json",
    )


def _sign(secret: bytes, image_id: str, expires: int) -> str:
    return hmac.new(secret, f"{image_id}.{expires}".encode(), hashlib.sha256).hexdigest()


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        raise _Invalid(f"field {name!r} must be a text part, not a file upload")
    return value


def _int_field(form: FormData, name: str, low: int, high: int) -> int | None:
    raw = _text(form, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise _Invalid(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise _Invalid(f"{name} must be between {low} and {high}, got {value}")
    return value


def _enum_field(form: FormData, name: str, choices: tuple[str, ...]) -> str | None:
    raw = _text(form, name)
    if raw is not None and raw not in choices:
        raise _Invalid(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


@dataclass(frozen=True)
class _GenerateRequest:
    prompt: str
    seed: int | None
    width: int
    height: int
    num_images: int
    magic_prompt: str
    style_type: str


def _validate(form: FormData) -> _GenerateRequest:
    unknown = sorted(set(form.keys()) - KNOWN_FIELDS)
    if unknown:
        raise _Invalid(f"unknown field(s): {', '.join(unknown)}")
    prompt = (_text(form, "prompt") or "").strip()
    if not prompt:
        raise _Invalid("prompt is required")
    seed = _int_field(form, "seed", *IDEOGRAM_SEED)
    num_images = _int_field(form, "num_images", *IDEOGRAM_NUM_IMAGES) or 1
    _enum_field(form, "rendering_speed", RENDERING_SPEEDS)
    magic = _enum_field(form, "magic_prompt", MAGIC_PROMPT) or "AUTO"
    style = _enum_field(form, "style_type", STYLE_TYPES) or "AUTO"
    _text(form, "negative_prompt")
    resolution = _text(form, "resolution")
    aspect_ratio = _text(form, "aspect_ratio")
    if resolution is not None and aspect_ratio is not None:
        # Ideogram answers this one in its older {"error": ...} shape.
        raise _Invalid("resolution and aspect_ratio cannot both be set", problem=False)
    if resolution is not None:
        if resolution not in WIRE_RESOLUTIONS:
            raise _Invalid(f"resolution {resolution!r} is not one of the supported resolutions")
        w, h = (int(v) for v in resolution.split("x"))
    elif aspect_ratio is not None:
        if aspect_ratio not in WIRE_ASPECT_RATIOS:
            choices = ", ".join(WIRE_ASPECT_RATIOS)
            raise _Invalid(f"aspect_ratio {aspect_ratio!r} is not one of {choices} (use an x: 16x9)")
        w, h = WIRE_ASPECT_RATIOS[aspect_ratio]
    else:
        w, h = WIRE_ASPECT_RATIOS[IDEOGRAM_DEFAULT_ASPECT_RATIO]
    return _GenerateRequest(prompt, seed, w, h, num_images, magic, style)


def create_app(board: FaultBoard, *, url_ttl_s: float = 3600.0) -> Starlette:
    """The Ideogram emulator. `app.state.ideogram.settings` can be changed while it runs (url_ttl_s)."""
    state = _State(IdeogramSettings(url_ttl_s=url_ttl_s))
    quiet_emulated_drops()

    async def generate(request: Request) -> Response:
        api_key = request.headers.get("api-key", "").strip()
        if not api_key or api_key == BAD_KEY:
            return _error(401, "Invalid or missing API key (send it in the Api-Key header)")
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            return _error(
                415, f"Unsupported Media Type: {content_type or 'none'}; send multipart/form-data"
            )
        try:
            form = await request.form()
        except Exception as exc:  # a broken multipart body is the client's fault, whatever the parser says
            return _problem(400, "Bad Request", f"could not parse the multipart body: {exc}")
        try:
            raw_prompt = form.get("prompt")
            fault = board.take_fault(PROVIDER, raw_prompt if isinstance(raw_prompt, str) else "")
            return await _answer(request, form, fault)
        finally:
            await form.close()

    async def _answer(request: Request, form: FormData, fault: Fault | None) -> Response:
        knobs = board.get(PROVIDER)
        retry_headers = {"Retry-After": str(knobs.retry_after_s)}
        # Infrastructure failures come before the body is looked at, as they would in front of the real service.
        if fault is Fault.AUTH:
            return _error(401, "Invalid API key")
        if fault is Fault.RATE_LIMIT:
            return _error(429, "Rate limit exceeded; slow down", retry_headers)
        if fault is Fault.SERVER_ERROR:
            return _error(500, "Internal Server Error")
        with state.lock:
            busy = state.in_flight >= knobs.concurrency
            if not busy:
                state.in_flight += 1
        if busy:
            return _error(429, f"Too many requests in flight (limit {knobs.concurrency})", retry_headers)
        try:
            if fault is Fault.HANG:
                await hold_open(request)
                return _error(504, "emulator: hung request released")
            if fault is Fault.DROP:
                return DroppedResponse("application/json", b'{"created": ')
            try:
                req = _validate(form)
            except _Invalid as exc:
                if exc.problem:
                    return _problem(400, "Bad Request", exc.detail)
                return _error(400, exc.detail)
            if fault is Fault.VALIDATION:
                return _problem(400, "Bad Request", "emulated validation failure: the request was rejected")
            if fault is Fault.SAFETY:
                return _problem(422, "Unprocessable Entity", "Prompt failed the safety check")
            await asyncio.sleep(knobs.latency_s)
            if fault is Fault.MALFORMED:
                return Response(b'{"created": "2026-', media_type="application/json")
            return _success(request, req, fault)
        finally:
            with state.lock:
                state.in_flight -= 1

    def _success(request: Request, req: _GenerateRequest, fault: Fault | None) -> JSONResponse:
        kind: ImageKind = "ok"
        if fault is Fault.IMAGE_404:
            kind = "missing"
        elif fault is Fault.NOT_AN_IMAGE:
            kind = "garbage"
        marker = _UNSAFE_MARKER.search(req.prompt)
        unsafe = int(marker.group(1)) if marker else 0
        base_seed = req.seed if req.seed is not None else secrets.randbelow(SEED_MAX + 1)
        expires = int(time.time() + state.settings.url_ttl_s)
        # Wherever this app is mounted (/ideogram in `imagegate emulator`), image URLs sit beside the endpoint.
        root = str(request.url.replace(query="")).removesuffix(GENERATE_PATH)
        shown_prompt = f"{req.prompt}, rendered in rich detail" if req.magic_prompt == "ON" else req.prompt
        data = []
        for i in range(req.num_images):
            seed = (base_seed + i) % (SEED_MAX + 1)
            safe = i >= unsafe
            url = ""
            if safe:
                image_id = state.remember(_ImageJob(req.prompt, seed, req.width, req.height, kind))
                sig = _sign(state.settings.secret, image_id, expires)
                url = f"{root}/ephemeral/{image_id}.png?expires={expires}&sig={sig}"
            data.append(
                {
                    "prompt": shown_prompt,
                    "resolution": f"{req.width}x{req.height}",
                    "is_image_safe": safe,
                    "seed": seed,
                    "url": url,
                    "style_type": req.style_type if req.style_type != "AUTO" else "GENERAL",
                }
            )
        return JSONResponse({"created": datetime.now(UTC).isoformat(), "data": data})

    async def ephemeral_image(request: Request) -> Response:
        image_id = str(request.path_params["image_id"])
        try:
            expires = int(request.query_params.get("expires", ""))
        except ValueError:
            return Response("missing or invalid expires", status_code=403, media_type="text/plain")
        given = request.query_params.get("sig", "")
        if not hmac.compare_digest(given, _sign(state.settings.secret, image_id, expires)):
            return Response("invalid signature", status_code=403, media_type="text/plain")
        if time.time() > expires:
            return Response("Request has expired", status_code=403, media_type="text/plain")
        job = state.recall(image_id)
        if job is None or job.kind == "missing":
            return Response("Not Found", status_code=404, media_type="text/plain")
        if job.kind == "garbage":
            return Response(b"<html><body>Service Unavailable</body></html>", media_type="image/png")
        png = await asyncio.to_thread(render_image, job.prompt, job.seed, job.width, job.height, "png")
        return Response(png, media_type="image/png")

    app = Starlette(
        routes=[
            Route(GENERATE_PATH, generate, methods=["POST"]),
            Route("/ephemeral/{image_id}.png", ephemeral_image, methods=["GET"]),
        ]
    )
    app.state.ideogram = state
    return app
