"""A stand-in for the Qwen/Qwen-Image Hugging Face Space: a real Gradio app with the Space's `/infer` endpoint.

The adapter talks to it with the real gradio_client, so the whole wire protocol (config, api info, queue join,
SSE stream with estimation/progress/completion messages, file download, cancel) is Gradio's own.

Signature (as on the Space): `infer(prompt, seed=0, randomize_seed=True, aspect_ratio="16:9",
guidance_scale=4.0, num_inference_steps=50, prompt_enhance=True) -> (image, seed)`. The image is a WEBP at the
Space's real size for the aspect ratio (emulator.api_facts.QWEN_SPACE_SIZES: the emulator's own statement, never
the product's catalog).

Knobs (emulator.faults.FaultBoard, provider "qwen"), read on every request so they can change at run time:
`latency_s` (spread over the steps, with a progress report per step) and `concurrency` (jobs run at once; the
rest wait in Gradio's queue and see their rank). `retry_after_s` is the wait the quota error announces.

Faults (a `[[fault:NAME]]` prompt marker or the board's standing fault):
- quota        gr.Error titled "ZeroGPU quota exceeded", "... Try again in H:MM:SS" (H:MM:SS = retry_after_s)
- rate_limit   gr.Error titled "ZeroGPU queue timeout" (ZeroGPU had no GPU free in time)
- validation   refused by the endpoint's validator at queue join (HTTP 422; the client raises ValidationError)
- server_error an unhandled exception in the function (as a CUDA failure would be)
- drop         the worker dies mid-run (an unhandled exception after the first step)
- hang         the function sleeps for HANG_S (until cancelled: Gradio cancels its task on /cancel)
- malformed    returns no image and no seed
- not_an_image returns a ".webp" file whose bytes are not an image
auth, safety, loading and image_404 have no analogue on a Space (auth fails in the client before any call) and
are ignored here.

gradio is an optional extra: it is imported when an app is built, never at module import.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from emulator.api_facts import (
    QWEN_SPACE_DEFAULT_ASPECT_RATIO,
    QWEN_SPACE_DEFAULT_GUIDANCE,
    QWEN_SPACE_DEFAULT_STEPS,
    QWEN_SPACE_GUIDANCE,
    QWEN_SPACE_SEED,
    QWEN_SPACE_SIZES,
    QWEN_SPACE_STEPS,
)
from emulator.faults import BOARD, Fault, FaultBoard, fault_in_prompt
from emulator.images import render_image

# The faults this emulator acts on (the control API refuses the others for it).
SUPPORTED_FAULTS: frozenset[Fault] = frozenset(
    {
        Fault.VALIDATION,
        Fault.RATE_LIMIT,
        Fault.SERVER_ERROR,
        Fault.HANG,
        Fault.DROP,
        Fault.MALFORMED,
        Fault.NOT_AN_IMAGE,
        Fault.QUOTA,
    }
)

PROVIDER = "qwen"
API_NAME = "infer"
SEED_MAX = QWEN_SPACE_SEED[1]
HANG_S = 600.0
"""A hang is bounded so a test that never cancels does not leave a task alive for the life of the process."""

QUOTA_TITLE = "ZeroGPU quota exceeded"
QUEUE_TIMEOUT_TITLE = "ZeroGPU queue timeout"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _import_gradio() -> Any:
    # Gradio reads this at import time; the emulator must never report usage anywhere.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RuntimeError("the Qwen-Image Space emulator needs gradio: pip install 'imagegate[emulator]'") from exc
    return gr


def format_wait(seconds: int) -> str:
    """Seconds as ZeroGPU prints a wait: H:MM:SS."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class _Outputs:
    """Where rendered files live until Gradio copies them into its cache; named by content, so they stay few."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="imagegate-qwen-space-"))

    def write(self, data: bytes, suffix: str) -> str:
        path = self.folder / f"{hashlib.sha256(data).hexdigest()}{suffix}"
        if not path.exists():
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return str(path)


def build_blocks(board: FaultBoard | None = None) -> Any:
    """The Gradio Blocks of the emulated Space (not yet served)."""
    gr = _import_gradio()
    board = board or BOARD
    outputs = _Outputs()
    ratios = list(QWEN_SPACE_SIZES)

    def validate(
        prompt: str,
        seed: float,
        randomize_seed: bool,
        aspect_ratio: str,
        guidance_scale: float,
        num_inference_steps: float,
        prompt_enhance: bool,
    ) -> tuple[dict[str, Any], ...]:
        # A standing validation fault is taken here (at queue join, like a real validator); any other standing
        # fault is left for infer() to take, so each request consumes at most one.
        invalid = fault_in_prompt(prompt) is Fault.VALIDATION
        if not invalid and board.get(PROVIDER).fault is Fault.VALIDATION:
            invalid = board.take_fault(PROVIDER, prompt) is Fault.VALIDATION
        prompt_check = gr.validate(True, "")
        if invalid:
            prompt_check = gr.validate(False, "The prompt was rejected by the Space's input validation.")
        elif not (prompt or "").strip():
            prompt_check = gr.validate(False, "Please enter a prompt.")
        ok = gr.validate(True, "")
        return (prompt_check, ok, ok, ok, ok, ok, ok)

    async def infer(
        prompt: str,
        seed: float = 0,
        randomize_seed: bool = True,
        aspect_ratio: str = "16:9",
        guidance_scale: float = 4.0,
        num_inference_steps: float = 50,
        prompt_enhance: bool = True,
        progress: Any = gr.Progress(track_tqdm=False),
    ) -> tuple[str | None, int | None]:
        fault = board.take_fault(PROVIDER, prompt)
        knobs = board.get(PROVIDER)
        if fault is Fault.QUOTA:
            wait = format_wait(knobs.retry_after_s)
            raise gr.Error(
                f"You have exceeded your GPU quota (60s requested vs. 0s left). Try again in {wait}",
                title=QUOTA_TITLE,
                print_exception=False,
            )
        if fault is Fault.RATE_LIMIT:
            raise gr.Error(
                "Your task waited too long in the ZeroGPU queue: no GPU was free. Try again later.",
                title=QUEUE_TIMEOUT_TITLE,
                print_exception=False,
            )
        if fault is Fault.SERVER_ERROR:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if fault is Fault.HANG:
            await asyncio.sleep(HANG_S)
        if aspect_ratio not in QWEN_SPACE_SIZES:
            # Gradio's Radio already refuses unknown choices; this guards direct calls of the function.
            raise gr.Error(f"Value: {aspect_ratio!r} is not in the list of choices: {ratios}")

        if randomize_seed:
            seed = random.randint(0, SEED_MAX)
        used_seed = int(seed)
        steps = max(1, int(num_inference_steps))
        per_step = max(0.0, knobs.latency_s) / steps
        for step in range(steps):
            progress((step, steps), desc="Generating", unit="steps")
            await asyncio.sleep(per_step)
            if fault is Fault.DROP:
                raise ConnectionResetError("ZeroGPU worker connection lost")
        progress((steps, steps), desc="Generating", unit="steps")

        if fault is Fault.MALFORMED:
            return None, None
        if fault is Fault.NOT_AN_IMAGE:
            return outputs.write(b"<html>502 Bad Gateway</html>", ".webp"), used_seed
        width, height = QWEN_SPACE_SIZES[aspect_ratio]
        # The guidance, step count and prompt-enhance flag change the picture, as they would on the Space.
        key = f"{prompt}\x00{guidance_scale}\x00{steps}\x00{bool(prompt_enhance)}"
        data = await asyncio.to_thread(render_image, key, used_seed, width, height, "webp")
        return outputs.write(data, ".webp"), used_seed

    with gr.Blocks(title="Qwen-Image (Imagegate emulator)", analytics_enabled=False) as demo:
        gr.Markdown("# Qwen-Image\nA local emulator of the Qwen/Qwen-Image Space. Images are placeholders.")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", show_label=False, placeholder="Enter your prompt", scale=4)
            run_button = gr.Button("Run", variant="primary", scale=1)
        result = gr.Image(label="Result", show_label=False, type="filepath", format="webp")
        with gr.Accordion("Advanced Settings", open=False):
            seed = gr.Slider(label="Seed", minimum=QWEN_SPACE_SEED[0], maximum=SEED_MAX, step=1, value=0)
            randomize_seed = gr.Checkbox(label="Randomize seed", value=True)
            aspect_ratio = gr.Radio(label="Aspect ratio", choices=ratios, value=QWEN_SPACE_DEFAULT_ASPECT_RATIO)
            guidance_scale = gr.Slider(
                label="Guidance scale",
                minimum=QWEN_SPACE_GUIDANCE[0],
                maximum=QWEN_SPACE_GUIDANCE[1],
                step=0.1,
                value=QWEN_SPACE_DEFAULT_GUIDANCE,
            )
            num_inference_steps = gr.Slider(
                label="Number of inference steps",
                minimum=QWEN_SPACE_STEPS[0],
                maximum=QWEN_SPACE_STEPS[1],
                step=1,
                value=QWEN_SPACE_DEFAULT_STEPS,
            )
            prompt_enhance = gr.Checkbox(label="Prompt Enhance", value=True)
        gr.on(
            triggers=[run_button.click, prompt.submit],
            fn=infer,
            inputs=[prompt, seed, randomize_seed, aspect_ratio, guidance_scale, num_inference_steps, prompt_enhance],
            outputs=[result, seed],
            api_name=API_NAME,
            validator=validate,
        )
    demo.queue(default_concurrency_limit=max(1, board.get(PROVIDER).concurrency))
    return demo


class MountableGradioApp:
    """ASGI app serving a Gradio Blocks, mountable under any prefix of a Starlette or FastAPI parent.

    Gradio starts its queue from the lifespan of the app it is launched with; a mounted sub-app gets no
    lifespan events from a Starlette parent, so the queue is started by whichever comes first: this app's own
    lifespan (served standalone) or its first request (mounted).
    """

    def __init__(self, blocks: Any) -> None:
        gr = _import_gradio()
        import fastapi

        self.blocks = blocks
        # mount_gradio_app does the blocks' set-up (config, queue settings, theme) that launch() would; the
        # throwaway parent is only its vehicle, the Gradio app mounted in it is what this class serves.
        holder = gr.mount_gradio_app(fastapi.FastAPI(), blocks, path="/app", show_error=True)
        self.gradio_app: Any = holder.routes[-1].app
        self._started = False
        self._start_lock: asyncio.Lock | None = None

    @property
    def max_queue_size(self) -> int | None:
        """Jobs allowed to wait; a join beyond it gets HTTP 503 (the client's QueueError "Queue is full")."""
        size: int | None = self.blocks._queue.max_size
        return size

    @max_queue_size.setter
    def max_queue_size(self, value: int | None) -> None:
        if value is not None and value < 0:
            raise ValueError(f"max_queue_size must be >= 0 or None, not {value}")
        self.blocks._queue.max_size = value

    def _before_request(self) -> None:
        """Hook for subclasses: runs before every HTTP request reaches Gradio."""

    async def _ensure_started(self) -> None:
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            self.blocks.run_startup_events()
            await self.blocks.run_extra_startup_events()
            self._started = True

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._ensure_started()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.blocks._queue.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self._ensure_started()
        self._before_request()
        await self.gradio_app(scope, receive, send)


class QwenSpaceApp(MountableGradioApp):
    """The emulated Qwen-Image Space, its queue limits following the board's knobs."""

    def __init__(self, board: FaultBoard | None = None) -> None:
        self.board = board or BOARD
        super().__init__(build_blocks(self.board))

    def _before_request(self) -> None:
        limit = max(1, self.board.get(PROVIDER).concurrency)
        # Event queues are created at the first join, from the default; later ones are updated in place.
        self.blocks._queue.default_concurrency_limit = limit
        for event_queue in self.blocks._queue.event_queue_per_concurrency_id.values():
            event_queue.concurrency_limit = limit


def create_app(board: FaultBoard | None = None) -> QwenSpaceApp:
    """The emulated Space as an ASGI app; mount it (e.g. at /qwen) or serve it on its own port."""
    return QwenSpaceApp(board)
