"""The offline sandbox adapter: deterministic images, provider-like events, sizes, counts, no network."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from typing import Any

import pytest
from PIL import Image

from common.errors import Billing, ErrorClass, InvalidInput, ProviderError
from core.providers.base import AdapterConfig, AdapterRequest, ConnectionMode, EventKind, ProgressEvent
from core.providers.sandbox import MAX_REPORTS, SandboxAdapter, checkpoints, running_reports
from core.render import RenderSpec, render_placeholder


def _adapter(latency_s: float = 0.05, **extra: Any) -> SandboxAdapter:
    return SandboxAdapter(AdapterConfig(mode=ConnectionMode.LIVE, extra={"latency_s": latency_s, **extra}))


def _request(prompt: str = "a red fox in the snow", timeout_s: float = 10.0, **params: Any) -> AdapterRequest:
    return AdapterRequest(prompt=prompt, params=params, timeout_s=timeout_s)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the sandbox must never open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


async def test_same_inputs_give_the_same_bytes_and_any_change_gives_other_bytes():
    adapter = _adapter()
    params: dict[str, Any] = {"seed": 7, "image_size": "512x512", "guidance_scale": 3.0, "num_inference_steps": 4}
    a = await adapter.generate(_request(**params))
    b = await adapter.generate(_request(**params))
    assert a.images[0].sha256 == b.images[0].sha256
    assert a.images[0].path == b.images[0].path  # content-addressed: stored once
    variants = [
        {**params, "seed": 8},
        {**params, "guidance_scale": 5.0},
        {**params, "num_inference_steps": 5},
        {**params, "negative_prompt": "blurry"},
    ]
    shas = {(await adapter.generate(_request(**v))).images[0].sha256 for v in variants}
    shas.add((await adapter.generate(_request("a blue fox", **params))).images[0].sha256)
    assert len(shas) == 5 and a.images[0].sha256 not in shas


def test_renderer_is_deterministic_and_marked_sandbox():
    spec = RenderSpec("a lighthouse", 3, 640, 480, guidance_scale=2.5, num_inference_steps=10)
    assert render_placeholder(spec) == render_placeholder(spec)
    with pytest.raises(ValueError, match="each side"):
        render_placeholder(RenderSpec("x", 1, 8, 8000))


def test_the_word_sandbox_is_drawn_large_in_the_middle():
    import io

    data = render_placeholder(RenderSpec("anything", 1, 600, 400))
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    # The label sits on a black plate with white letters across the centre of the image.
    row = [rgb.getpixel((x, 200)) for x in range(150, 450)]
    assert sum(1 for p in row if p == (0, 0, 0)) > 30
    assert sum(1 for p in row if isinstance(p, tuple) and min(p) > 200) > 10


async def test_events_count_down_the_queue_then_report_progress_and_completion():
    adapter = _adapter(latency_s=0.1, queue_length=3)
    events: list[ProgressEvent] = []
    ids: list[str] = []
    result = await adapter.generate(
        _request(num_inference_steps=5, seed=1), on_event=events.append, on_request_id=ids.append
    )
    assert ids == [result.provider_request_id]
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.SUBMITTED and kinds[-1] is EventKind.COMPLETED
    assert [e.queue_position for e in events if e.kind is EventKind.QUEUED] == [3, 2, 1]
    # 0.08 s of running is less than one report interval: the first step, then done.
    running = [(e.progress, e.message) for e in events if e.kind is EventKind.RUNNING]
    assert running == [(0.0, "step 1/5"), (1.0, "")]
    assert kinds.index(EventKind.DOWNLOADING) < kinds.index(EventKind.COMPLETED)
    assert all(e.provider == "sandbox" and e.provider_request_id == ids[0] for e in events)


async def test_running_reports_come_at_a_bounded_cadence_with_one_timer_each(monkeypatch: pytest.MonkeyPatch):
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_later = loop.call_later

    def counting_call_later(delay: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        timers.append(delay)
        return call_later(delay, *args, **kwargs)

    monkeypatch.setattr(loop, "call_later", counting_call_later)
    events: list[ProgressEvent] = []
    started = time.monotonic()
    await _adapter(latency_s=0.5, queue_length=0).generate(
        _request(num_inference_steps=25, image_size="square"), on_event=events.append
    )
    assert time.monotonic() - started >= 0.5  # the whole simulated latency, in two sleeps
    running = [(e.progress, e.message) for e in events if e.kind is EventKind.RUNNING]
    assert running == [(0.0, "step 1/25"), (12 / 25, "step 13/25"), (1.0, "")]
    assert len(timers) == 2 and abs(sum(timers) - 0.5) < 1e-9

    timers.clear()
    events.clear()
    await _adapter(latency_s=0.0, queue_length=2).generate(
        _request(num_inference_steps=25, image_size="square"), on_event=events.append
    )
    assert timers == []  # latency 0: no sleeps at all
    assert [e.queue_position for e in events if e.kind is EventKind.QUEUED] == [2, 1]
    assert [e.message for e in events if e.kind is EventKind.RUNNING] == ["step 1/25", ""]


def test_report_plan_is_bounded_and_adds_up_to_every_unit():
    assert [running_reports(25, s) for s in (0.0, 0.24, 0.25, 0.5, 0.99, 1.0, 60.0)] == [1, 1, 1, 2, 3, 4, 8]
    assert running_reports(3, 60.0) == 3  # never more reports than steps
    assert checkpoints(3, 8) == [(0, 1), (1, 1), (2, 1)]
    assert checkpoints(25, 1) == [(0, 25)]
    plan = checkpoints(25, 8)
    assert [start for start, _ in plan] == [0, 3, 6, 9, 12, 15, 18, 21]
    assert sum(stride for _, stride in plan) == 25
    for units in range(1, 60):
        for reports in range(1, 12):
            plan = checkpoints(units, reports)
            assert len(plan) == min(units, reports) and plan[0][0] == 0
            assert all(stride >= 1 for _, stride in plan) and sum(stride for _, stride in plan) == units
            assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(plan))


async def test_a_long_queue_reports_at_most_max_reports_positions_counting_down():
    events: list[ProgressEvent] = []
    await _adapter(latency_s=0.0, queue_length=20).generate(
        _request(num_inference_steps=2, image_size="square"), on_event=events.append
    )
    positions = [e.queue_position for e in events if e.kind is EventKind.QUEUED]
    assert len(positions) == MAX_REPORTS and positions == [20, 18, 15, 13, 10, 8, 5, 3]
    assert all(e.queue_size == 20 for e in events if e.kind is EventKind.QUEUED)


async def test_async_callbacks_are_awaited():
    seen: list[EventKind] = []

    async def on_event(event: ProgressEvent) -> None:
        await asyncio.sleep(0)
        seen.append(event.kind)

    await _adapter().generate(_request(num_inference_steps=1), on_event=on_event)
    assert EventKind.COMPLETED in seen


async def test_latency_follows_the_config():
    started = time.monotonic()
    await _adapter(latency_s=0.4).generate(_request(num_inference_steps=4, image_size="square"))
    assert time.monotonic() - started >= 0.4


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [("square_hd", (1024, 1024)), ("portrait_16_9", (576, 1024)), ("800x600", (800, 600)), ("16:9", None)],
)
async def test_sizes(image_size: str, expected: tuple[int, int] | None):
    result = await _adapter().generate(_request(image_size=image_size, seed=1, num_inference_steps=1))
    image = result.images[0]
    assert image.format == "png"
    if expected is None:  # an aspect ratio becomes about one megapixel of that shape
        assert abs(image.width / image.height - 16 / 9) < 0.02
        assert 0.8e6 < image.width * image.height < 1.2e6
    else:
        assert (image.width, image.height) == expected


async def test_default_size_is_the_catalog_default():
    image = (await _adapter().generate(_request(num_inference_steps=1))).images[0]
    assert (image.width, image.height) == (1024, 1024)


async def test_count_gives_consecutive_seeds_and_distinct_images():
    result = await _adapter().generate(_request(num_images=4, seed=100, image_size="square"))
    assert len(result.images) == 4
    assert result.seed == 100 and result.raw_metadata["seeds"] == [100, 101, 102, 103]
    assert len({i.sha256 for i in result.images}) == 4
    single = await _adapter().generate(_request(num_images=1, seed=102, image_size="square"))
    assert single.images[0].sha256 == result.images[2].sha256


async def test_no_seed_means_a_random_seed_that_is_returned_and_reproduces():
    adapter = _adapter()
    a = await adapter.generate(_request(image_size="square"))
    b = await adapter.generate(_request(image_size="square"))
    assert isinstance(a.seed, int) and a.seed != b.seed
    again = await adapter.generate(_request(image_size="square", seed=a.seed))
    assert again.images[0].sha256 == a.images[0].sha256


async def test_result_is_free_offline_and_sandbox_mode_whatever_the_config():
    adapter = _adapter()
    assert adapter.mode is ConnectionMode.SANDBOX
    result = await adapter.generate(_request(image_size="square"))
    assert result.mode is ConnectionMode.SANDBOX and result.billed_units is None
    report = await adapter.health_probe()
    assert report.ok


async def test_other_providers_params_are_tolerated_and_noted():
    result = await _adapter().generate(
        _request(image_size="square", rendering_speed="TURBO", prompt_enhance=True, acceleration=None)
    )
    notes = " | ".join(result.translation.notes)
    assert "rendering_speed" in notes and "prompt_enhance" in notes
    assert "acceleration" not in notes  # unset values are not noise


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", {}, "prompt"),
        ("x", {"num_images": 5}, "num_images"),
        ("x", {"num_inference_steps": 0}, "num_inference_steps"),
        ("x", {"guidance_scale": 25}, "guidance_scale"),
        ("x", {"seed": -3}, "seed"),
        ("x", {"seed": True}, "seed"),
        ("x", {"image_size": "10x10"}, "image_size"),
        ("x", {"image_size": "enormous"}, "image_size"),
        ("x", {"guidance_scale": "3"}, "guidance_scale"),  # the one validator's strict types
    ],
)
async def test_bad_input_is_a_validation_error_naming_the_field(prompt: str, params: dict[str, Any], field: str):
    with pytest.raises(InvalidInput) as refused:
        _adapter().translate(_request(prompt, **params))
    assert list(refused.value.field_errors) == [field]
    events: list[ProgressEvent] = []
    with pytest.raises(ProviderError) as info:
        await _adapter().generate(_request(prompt, **params), on_event=events.append)
    assert info.value.error_class is ErrorClass.VALIDATION
    assert info.value.billing is Billing.NOT_BILLED
    assert field in info.value.message
    assert events == []  # refused before anything started


async def test_timeout_and_cancel():
    slow = _adapter(latency_s=5.0)
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await slow.generate(_request(timeout_s=0.3, image_size="square"))
    assert info.value.error_class is ErrorClass.TIMEOUT
    assert info.value.billing is Billing.NOT_BILLED
    assert time.monotonic() - started < 1.0

    ids: list[str] = []
    task = asyncio.create_task(slow.generate(_request(image_size="square"), on_request_id=ids.append))
    while not ids:
        await asyncio.sleep(0.01)
    cancelled_at = time.monotonic()
    await slow.cancel(ids[0])
    with pytest.raises(ProviderError) as cancelled:
        await task
    assert time.monotonic() - cancelled_at < 0.25  # the pause in progress (0.5 s per position) ends at once
    assert cancelled.value.error_class is ErrorClass.CANCELLED
    assert cancelled.value.billing is Billing.NOT_BILLED
    with pytest.raises(ProviderError) as unknown:
        await slow.cancel(ids[0])
    assert unknown.value.billing is Billing.NOT_BILLED


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="latency_s"):
        SandboxAdapter(AdapterConfig(extra={"latency_s": -1}))
    with pytest.raises(ValueError, match="latency_s"):
        SandboxAdapter(AdapterConfig(extra={"latency_s": "slow"}))
