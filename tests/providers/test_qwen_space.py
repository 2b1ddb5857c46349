"""The qwen adapter through the real gradio_client against the real Gradio emulator, mounted under a prefix."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

pytest.importorskip("gradio")

from common.errors import Billing, ErrorClass, InvalidInput, ProviderError
from core.providers.base import AdapterConfig, AdapterRequest, ConnectionMode, EventKind, ProgressEvent
from core.providers.qwen_space import QwenSpaceAdapter, check_signature, map_error, parse_wait
from emulator.faults import BOARD, Fault
from emulator.qwen_space import MountableGradioApp, create_app
from emulator.runner import free_port, serve_in_thread

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class _NetworkGuard:
    """Records any attempt to reach a host other than loopback (Gradio or the client phoning home)."""

    def __init__(self) -> None:
        self.attempts: list[object] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_connect = socket.socket.connect
        real_getaddrinfo = socket.getaddrinfo

        def connect(sock: socket.socket, address: Any) -> Any:
            if isinstance(address, tuple) and address[0] not in _LOOPBACK:
                self.attempts.append(address)
                raise OSError(f"test network guard: {address} is not loopback")
            return real_connect(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host not in _LOOPBACK and host is not None:
                self.attempts.append(("dns", host))
            return real_getaddrinfo(host, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _wrong_blocks(endpoint: str, with_steps: bool) -> Any:
    """A Gradio app that is not the Qwen Space: /infer with another signature, or no /infer at all."""
    import gradio as gr

    def fn(prompt: str, steps: float = 10) -> str:
        return prompt

    with gr.Blocks() as blocks:
        prompt = gr.Textbox()
        steps = gr.Slider(1, 50, value=10)
        out = gr.Textbox()
        inputs = [prompt, steps] if with_steps else [prompt]
        gr.Button().click(fn, inputs=inputs, outputs=out, api_name=endpoint)
    blocks.queue()
    return blocks


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, Any]]:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    guard = _NetworkGuard()
    patcher = pytest.MonkeyPatch()
    guard.install(patcher)
    qwen = create_app(BOARD)
    parent = Starlette(
        routes=[
            Mount("/qwen", app=qwen),
            Mount("/changed", app=MountableGradioApp(_wrong_blocks("infer", with_steps=True))),
            Mount("/other", app=MountableGradioApp(_wrong_blocks("generate", with_steps=False))),
        ]
    )
    try:
        with serve_in_thread(parent) as srv:
            yield {"url": srv.url, "app": qwen, "guard": guard}
    finally:
        patcher.undo()


@pytest.fixture(autouse=True)
def clean_board(server: dict[str, Any]) -> Iterator[None]:
    BOARD.reset()
    BOARD.configure("qwen", latency_s=0.2)
    server["app"].max_queue_size = None
    yield
    BOARD.reset()
    server["app"].max_queue_size = None


@pytest.fixture
async def adapter(server: dict[str, Any]) -> Any:
    a = QwenSpaceAdapter(
        AdapterConfig(base_url=f"{server['url']}/qwen/", mode=ConnectionMode.EMULATOR, poll_interval_s=0.02)
    )
    yield a
    await a.aclose()


def _request(prompt: str = "a lighthouse at dusk", timeout_s: float = 30.0, **params: Any) -> AdapterRequest:
    base: dict[str, Any] = {"image_size": "16:9", "num_inference_steps": 8, "guidance_scale": 4.0}
    base.update(params)
    return AdapterRequest(prompt=prompt, params=base, timeout_s=timeout_s)


async def _expect_error(adapter: QwenSpaceAdapter, request: AdapterRequest) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await adapter.generate(request)
    assert info.value.billing is Billing.NOT_BILLED  # the Space charges no money, whatever happens
    return info.value


# -- success ----------------------------------------------------------------------------------------------


async def test_generates_a_webp_at_the_aspect_ratios_size_and_returns_the_seed(adapter: QwenSpaceAdapter):
    result = await adapter.generate(_request(image_size="9:16", seed=1234))
    assert result.provider == "qwen" and result.mode is ConnectionMode.EMULATOR
    (image,) = result.images
    assert (image.format, image.width, image.height) == ("webp", 928, 1664)
    assert image.path.read_bytes()[8:12] == b"WEBP"
    assert result.seed == 1234
    assert result.provider_request_id
    assert result.translation.wire_params["randomize_seed"] is False
    assert result.timings.total_s >= result.timings.run_s > 0


async def test_fixed_seed_is_reproducible_and_no_seed_gets_a_random_one_back(adapter: QwenSpaceAdapter):
    first = await adapter.generate(_request(seed=77))
    second = await adapter.generate(_request(seed=77))
    assert first.images[0].sha256 == second.images[0].sha256

    random = await adapter.generate(_request())
    assert random.translation.wire_params["randomize_seed"] is True
    assert isinstance(random.seed, int) and random.seed != 77
    assert random.images[0].sha256 != first.images[0].sha256
    # The seed handed back is the one the Space used: asking for it again gives the same image.
    replay = await adapter.generate(_request(seed=random.seed))
    assert replay.images[0].sha256 == random.images[0].sha256


async def test_reports_queue_rank_and_step_progress(adapter: QwenSpaceAdapter):
    BOARD.configure("qwen", concurrency=1, latency_s=0.6)
    events: dict[int, list[ProgressEvent]] = {0: [], 1: [], 2: []}
    ids: list[str] = []

    async def run(i: int) -> Any:
        return await adapter.generate(
            _request(f"queued {i}", seed=i), on_event=events[i].append, on_request_id=ids.append
        )

    results = await asyncio.gather(*(run(i) for i in range(3)))
    assert len(ids) == 3 and all(r.images for r in results)
    everything = [e for evs in events.values() for e in evs]
    queued = [e for e in everything if e.kind is EventKind.QUEUED]
    assert queued, "with one job at a time, two of three requests must have waited in the queue"
    assert all(e.queue_position is not None and e.queue_position >= 1 for e in queued)
    assert max(e.queue_position or 0 for e in queued) >= 2
    for evs in events.values():
        kinds = [e.kind for e in evs]
        assert kinds[0] is EventKind.SUBMITTED and kinds[-1] is EventKind.COMPLETED
        progress = [e.progress for e in evs if e.kind is EventKind.RUNNING and e.progress is not None]
        assert progress == sorted(progress) and any(0 < p < 1 for p in progress)


async def test_translates_canonical_parameters_and_notes_what_changed(adapter: QwenSpaceAdapter):
    t = adapter.translate(
        AdapterRequest(
            prompt="p",
            params={
                "image_size": "landscape_4_3",
                "guidance_scale": 12.5,
                "num_inference_steps": 30,
                "negative_prompt": "blur",
                "prompt_enhance": False,
            },
        )
    )
    assert t.wire_params["aspect_ratio"] == "4:3"
    assert t.wire_params["guidance_scale"] == 10.0
    assert t.wire_params["prompt_enhance"] is False
    assert t.wire_params["seed"] == 0 and t.wire_params["randomize_seed"] is True
    joined = " | ".join(t.notes)
    assert "landscape_4_3" in joined and "guidance_scale" in joined and "negative_prompt" in joined

    bad_values: list[dict[str, Any]] = [
        {"num_images": 2},
        {"seed": -1},
        {"num_inference_steps": "many"},
        {"num_inference_steps": True},  # the one validator's strict types: True is not 1
        {"guidance_scale": "4"},
        {"image_size": "huge"},
    ]
    for bad in bad_values:
        with pytest.raises(InvalidInput) as refused:
            adapter.translate(AdapterRequest(prompt="p", params=bad))
        assert list(refused.value.field_errors) == list(bad)
        err = await _expect_error(adapter, AdapterRequest(prompt="p", params=bad))
        assert err.error_class is ErrorClass.VALIDATION
        assert next(iter(bad)) in err.message


# -- errors -----------------------------------------------------------------------------------------------


async def test_zerogpu_quota_maps_to_quota_exceeded_with_the_wait_parsed(adapter: QwenSpaceAdapter):
    BOARD.configure("qwen", retry_after_s=754)  # the emulator says "Try again in 0:12:34"
    before = datetime.now(UTC)
    err = await _expect_error(adapter, _request("[[fault:quota]] a cat"))
    assert err.error_class is ErrorClass.QUOTA_EXCEEDED
    assert err.retry_after_s == 754
    assert err.reset_at is not None
    assert 750 <= (err.reset_at - before).total_seconds() <= 760
    assert "ZeroGPU quota exceeded" in err.message and "0:12:34" in err.message


async def test_other_space_errors_are_classified(adapter: QwenSpaceAdapter):
    cases = {
        "[[fault:rate_limit]]": ErrorClass.RATE_LIMITED,  # ZeroGPU queue timeout
        "[[fault:validation]]": ErrorClass.VALIDATION,  # the endpoint's validator, HTTP 422 at join
        "[[fault:server_error]]": ErrorClass.UNAVAILABLE,  # the function raised
        "[[fault:drop]]": ErrorClass.UNAVAILABLE,
        "[[fault:malformed]]": ErrorClass.BAD_RESPONSE,  # no image
        "[[fault:not_an_image]]": ErrorClass.BAD_RESPONSE,  # bytes that are not an image
    }
    for marker, expected in cases.items():
        err = await _expect_error(adapter, _request(f"{marker} a cat"))
        assert err.error_class is expected, (marker, err)
        assert err.provider == "qwen"


async def test_a_standing_fault_applies_to_the_next_requests_only(adapter: QwenSpaceAdapter):
    BOARD.set_fault("qwen", Fault.QUOTA, count=1)
    err = await _expect_error(adapter, _request())
    assert err.error_class is ErrorClass.QUOTA_EXCEEDED
    assert (await adapter.generate(_request())).images


async def test_a_full_queue_is_rate_limited(adapter: QwenSpaceAdapter, server: dict[str, Any]):
    server["app"].max_queue_size = 0
    err = await _expect_error(adapter, _request())
    assert err.error_class is ErrorClass.RATE_LIMITED
    assert "full" in err.message.lower()


async def test_a_hang_is_bounded_by_the_request_timeout_and_cancelled_upstream(adapter: QwenSpaceAdapter):
    BOARD.configure("qwen", concurrency=1)
    started = time.monotonic()
    err = await _expect_error(adapter, _request("[[fault:hang]] a cat", timeout_s=2.0))
    elapsed = time.monotonic() - started
    assert err.error_class is ErrorClass.TIMEOUT
    assert 1.9 <= elapsed < 4.0
    # The hung job was cancelled on the Space, so its only slot is free again.
    result = await adapter.generate(_request(timeout_s=10.0))
    assert result.images


async def test_a_dead_host_is_unavailable_within_seconds():
    dead = QwenSpaceAdapter(AdapterConfig(base_url=f"http://127.0.0.1:{free_port()}/qwen/"))
    started = time.monotonic()
    err = await _expect_error(dead, _request())
    assert err.error_class is ErrorClass.UNAVAILABLE
    assert time.monotonic() - started < 5
    report = await dead.health_probe()
    assert not report.ok and report.error_class is ErrorClass.UNAVAILABLE
    await dead.aclose()


@pytest.fixture
def silent_host() -> Iterator[str]:
    """A host that accepts connections and never answers (a hung load balancer, a Space stuck starting)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/qwen/"


@pytest.mark.parametrize(
    ("connect_timeout_s", "read_timeout_s"),
    [
        (1.0, 5.0),  # our connect bound passes first
        (1.0, 0.5),  # gradio_client's own read timeout fires first
    ],
)
async def test_a_health_probe_of_a_host_that_never_answers_is_unavailable(
    silent_host: str, connect_timeout_s: float, read_timeout_s: float
):
    silent = QwenSpaceAdapter(
        AdapterConfig(
            base_url=silent_host,
            mode=ConnectionMode.EMULATOR,
            extra={"connect_timeout_s": connect_timeout_s, "read_timeout_s": read_timeout_s},
        )
    )
    report = await silent.health_probe()
    await silent.aclose()
    assert not report.ok
    assert report.error_class is ErrorClass.UNAVAILABLE, report
    assert "could not connect" in report.detail
    assert "deadline" not in report.detail


async def test_cancel_stops_one_request_and_not_another(adapter: QwenSpaceAdapter):
    BOARD.configure("qwen", latency_s=1.5)
    ids: list[str] = []
    victim = asyncio.create_task(adapter.generate(_request("victim", seed=1), on_request_id=ids.append))
    bystander = asyncio.create_task(adapter.generate(_request("bystander", seed=2)))
    deadline = time.monotonic() + 10
    while not ids and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert ids, "the request id must be reported before the result"
    started = time.monotonic()
    await adapter.cancel(ids[0])
    with pytest.raises(ProviderError) as info:
        await victim
    assert info.value.error_class is ErrorClass.CANCELLED
    assert time.monotonic() - started < 2.0
    assert (await bystander).images  # Gradio cancels by session; each request has its own
    assert info.value.billing is Billing.NOT_BILLED
    with pytest.raises(ProviderError) as unknown:
        await adapter.cancel(ids[0])
    assert unknown.value.error_class is ErrorClass.VALIDATION
    assert unknown.value.billing is Billing.NOT_BILLED


@pytest.mark.parametrize("mount", ["changed", "other"])
async def test_an_unexpected_endpoint_signature_is_a_bad_response(server: dict[str, Any], mount: str):
    wrong = QwenSpaceAdapter(AdapterConfig(base_url=f"{server['url']}/{mount}/", mode=ConnectionMode.EMULATOR))
    err = await _expect_error(wrong, _request())
    assert err.error_class is ErrorClass.BAD_RESPONSE
    assert "/infer" in err.message
    report = await wrong.health_probe()
    assert not report.ok and report.error_class is ErrorClass.BAD_RESPONSE
    await wrong.aclose()


async def test_health_probe_connects_without_generating(adapter: QwenSpaceAdapter):
    BOARD.set_fault("qwen", Fault.QUOTA)  # any generation would fail
    report = await adapter.health_probe()
    assert report.ok and report.error_class is None
    assert BOARD.get("qwen").fault is Fault.QUOTA  # nothing was consumed


async def test_nothing_reached_beyond_loopback(server: dict[str, Any], adapter: QwenSpaceAdapter):
    await adapter.generate(_request())
    assert server["guard"].attempts == []


# -- error mapping of what the emulator cannot easily provoke ------------------------------------------------


def test_error_mapping_covers_the_clients_exceptions():
    import httpx
    from gradio_client.exceptions import AppError, AuthenticationError
    from gradio_client.utils import QueueError

    request = httpx.Request("POST", "http://127.0.0.1/gradio_api/queue/join")
    cases: list[tuple[BaseException, ErrorClass]] = [
        (AppError("Try again in 1:00:00", title="ZeroGPU pending credits exceeded"), ErrorClass.QUOTA_EXCEEDED),
        (AppError("Requested 300s", title="ZeroGPU illegal duration"), ErrorClass.UNAVAILABLE),
        (AppError("Value: '5:4' is not in the list of choices: ['1:1']"), ErrorClass.VALIDATION),
        (AppError("CUDA out of memory"), ErrorClass.UNAVAILABLE),
        (QueueError("Queue is full! Please try again."), ErrorClass.RATE_LIMITED),
        (AuthenticationError("Could not login"), ErrorClass.AUTH),
        (httpx.ConnectError("refused", request=request), ErrorClass.UNAVAILABLE),
        (httpx.ReadTimeout("slow", request=request), ErrorClass.TIMEOUT),
        (ValueError("The current space is in the invalid state: PAUSED."), ErrorClass.UNAVAILABLE),
        (KeyError("data"), ErrorClass.BAD_RESPONSE),
    ]
    for status, expected in (
        (400, ErrorClass.VALIDATION),
        (429, ErrorClass.RATE_LIMITED),
        (503, ErrorClass.UNAVAILABLE),
    ):
        response = httpx.Response(status, text="nope", request=request)
        cases.append((httpx.HTTPStatusError("x", request=request, response=response), expected))
    for exc, expected in cases:
        mapped = map_error(exc, request_id="ev1")
        assert mapped.error_class is expected, (exc, mapped)
        assert mapped.provider == "qwen" and mapped.provider_request_id == "ev1"
        assert mapped.billing is Billing.NOT_BILLED


def test_wait_parsing_and_signature_check():
    assert parse_wait("... Try again in 0:12:34") == 754
    assert parse_wait("Try again in 12:05") == 725
    assert parse_wait("no wait here") is None
    good = {
        "named_endpoints": {
            "/infer": {
                "parameters": [
                    {"parameter_name": n}
                    for n in (
                        "prompt",
                        "seed",
                        "randomize_seed",
                        "aspect_ratio",
                        "guidance_scale",
                        "num_inference_steps",
                        "prompt_enhance",
                    )
                ],
                "returns": [{}, {}],
            }
        }
    }
    check_signature(good)
    good["named_endpoints"]["/infer"]["returns"] = [{}]
    with pytest.raises(ProviderError) as info:
        check_signature(good)
    assert info.value.error_class is ErrorClass.BAD_RESPONSE
