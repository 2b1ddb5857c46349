"""HuggingFaceAdapter through huggingface_hub's InferenceClient against the HF emulator on a loopback port."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterator

import pytest
from huggingface_hub import constants as hf_constants
from PIL import Image
from starlette.applications import Starlette
from starlette.routing import Mount

from common.errors import Billing, ErrorClass, InvalidInput, ProviderError
from core.providers.base import AdapterConfig, AdapterRequest, ConnectionMode, EventKind, ProgressEvent
from core.providers.huggingface import HuggingFaceAdapter, _attempt_billing
from emulator.faults import BOARD, Fault
from emulator.hf import create_app
from emulator.runner import BackgroundServer, free_port, serve_in_thread

TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def emulator_app() -> Starlette:
    return create_app(BOARD)


@pytest.fixture(scope="module")
def server(emulator_app: Starlette) -> Iterator[BackgroundServer]:
    with serve_in_thread(emulator_app) as srv:
        yield srv


@pytest.fixture(autouse=True)
def fresh_board(emulator_app: Starlette) -> Iterator[None]:
    BOARD.reset()
    BOARD.configure("hf", latency_s=0.01)
    yield
    emulator_app.state.hf.settings.cold_start_s = 0.0
    BOARD.reset()


def adapter(
    server: BackgroundServer, token: str | None = TOKEN, *, base_url: str | None = "", **extra: object
) -> HuggingFaceAdapter:
    return HuggingFaceAdapter(
        AdapterConfig(
            api_key=token,
            base_url=server.url if base_url == "" else base_url,
            mode=ConnectionMode.EMULATOR,
            extra=extra,
        )
    )


def req(prompt: str = "a red fox in snow", timeout_s: float = 10.0, **params: object) -> AdapterRequest:
    return AdapterRequest(prompt=prompt, params=params, timeout_s=timeout_s)


async def failure(coro: object) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await coro  # type: ignore[misc]
    return caught.value


# -- success -----------------------------------------------------------------------------------------------


async def test_generates_a_stored_png_of_the_requested_size(server: BackgroundServer) -> None:
    events: list[ProgressEvent] = []
    result = await adapter(server).generate(
        req(
            image_size="512x384",
            seed=21,
            num_inference_steps=12,
            guidance_scale=4.5,
            negative_prompt="blur",
            model="Qwen/Qwen-Image",
        ),
        on_event=events.append,
    )
    assert result.provider == "huggingface"
    assert result.seed == 21
    assert len(result.images) == 1
    image = result.images[0]
    assert (image.width, image.height) == (512, 384)
    assert image.format == "png"
    with Image.open(image.path) as opened:
        assert opened.size == (512, 384)
    wire = result.translation.wire_params
    assert wire["model"] == f"{server.url}/models/Qwen/Qwen-Image"
    assert (wire["num_inference_steps"], wire["guidance_scale"], wire["negative_prompt"]) == (12, 4.5, "blur")
    assert result.translation.exact
    assert events[0].kind is EventKind.RUNNING and events[-1].kind is EventKind.COMPLETED


async def test_without_a_seed_one_is_chosen_and_reproduces_the_image(server: BackgroundServer) -> None:
    first = await adapter(server).generate(req(image_size="256x256"))
    assert first.seed is not None
    again = await adapter(server).generate(req(image_size="256x256", seed=first.seed))
    assert again.images[0].sha256 == first.images[0].sha256


async def test_several_images_are_several_calls_with_consecutive_seeds(server: BackgroundServer) -> None:
    result = await adapter(server).generate(req(image_size="square", num_images=3, seed=10))
    assert len(result.images) == 3
    assert result.raw_metadata["seeds"] == [10, 11, 12]
    assert len({image.sha256 for image in result.images}) == 3
    assert all((i.width, i.height) == (512, 512) for i in result.images)
    assert any("3 calls" in note for note in result.translation.notes)


async def test_an_endpoint_url_is_called_directly(server: BackgroundServer) -> None:
    hf = adapter(server, base_url=None)
    result = await hf.generate(req(model=f"{server.url}/", image_size="256x512", seed=1))
    assert (result.images[0].width, result.images[0].height) == (256, 512)
    assert result.translation.wire_params["provider"] is None


async def test_one_failed_call_of_several_keeps_the_others(server: BackgroundServer) -> None:
    BOARD.set_fault("hf", Fault.SERVER_ERROR, count=1)
    result = await adapter(server).generate(req(image_size="square", num_images=2, seed=3))
    assert len(result.images) == 1
    [failed] = result.raw_metadata["failed_calls"]
    assert failed["error_class"] == "unavailable"
    assert failed["billing"] == "not_billed"


async def test_works_with_the_emulator_mounted_under_a_prefix() -> None:
    app = Starlette(routes=[Mount("/hf", app=create_app(BOARD))])
    with serve_in_thread(app) as mounted:
        hf = HuggingFaceAdapter(AdapterConfig(api_key=TOKEN, base_url=mounted.url + "/hf"))
        result = await hf.generate(req(image_size="256x256", seed=2))
        assert (result.images[0].width, result.images[0].height) == (256, 256)
        assert (await hf.health_probe()).ok


def test_translate_refuses_bad_values_before_calling() -> None:
    dead = HuggingFaceAdapter(AdapterConfig(api_key=TOKEN, base_url=f"http://127.0.0.1:{free_port()}"))
    for params, field in (
        ({"inference_provider": "nobody"}, "inference_provider"),
        ({"model": "../../etc/passwd"}, "model"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"image_size": "4096x4096"}, "image_size"),
        ({"num_images": 5}, "num_images"),
        ({"seed": 1.5}, "seed"),
    ):
        with pytest.raises(InvalidInput) as caught:
            dead.translate(req(**params))
        assert list(caught.value.field_errors) == [field]
    with pytest.raises(InvalidInput) as empty:
        dead.translate(req(" "))
    assert list(empty.value.field_errors) == ["prompt"]


async def test_a_request_translate_refuses_fails_generate_unbilled_before_any_call() -> None:
    dead = HuggingFaceAdapter(AdapterConfig(api_key=TOKEN, base_url=f"http://127.0.0.1:{free_port()}"))
    err = await failure(dead.generate(req(num_images=5)))
    assert (err.error_class, err.billing) == (ErrorClass.VALIDATION, Billing.NOT_BILLED)


def test_translate_rounds_sizes_and_notes_what_it_cannot_send() -> None:
    hf = HuggingFaceAdapter(AdapterConfig(api_key=TOKEN))
    t = hf.translate(req(image_size="1001x700", enable_safety_checker=True, inference_provider="fal-ai"))
    assert (t.wire_params["width"], t.wire_params["height"]) == (1000, 704)
    assert t.wire_params["model"] == "Qwen/Qwen-Image" and t.wire_params["provider"] == "fal-ai"
    assert any("rounded" in n for n in t.notes)
    assert any("enable_safety_checker" in n for n in t.notes)


def test_telemetry_is_off() -> None:
    assert hf_constants.HF_HUB_DISABLE_TELEMETRY is True


# -- errors ------------------------------------------------------------------------------------------------


async def test_a_bad_token_is_auth(server: BackgroundServer) -> None:
    err = await failure(adapter(server, token="hf_bad").generate(req()))
    assert err.error_class is ErrorClass.AUTH
    assert err.status_code == 401
    assert err.billing is Billing.NOT_BILLED


async def test_a_missing_token_fails_without_calling(server: BackgroundServer) -> None:
    err = await failure(adapter(server, token=None).generate(req()))
    assert err.error_class is ErrorClass.AUTH
    assert err.status_code is None
    assert err.billing is Billing.NOT_BILLED


@pytest.mark.parametrize(
    ("fault", "error_class", "status", "text"),
    [
        ("validation", ErrorClass.VALIDATION, 400, "emulated validation failure"),
        ("safety", ErrorClass.SAFETY_REJECTED, 400, "safety checker"),
        ("image_404", ErrorClass.VALIDATION, 404, "no such model"),
        ("quota", ErrorClass.QUOTA_EXCEEDED, 402, "credits"),
        ("server_error", ErrorClass.UNAVAILABLE, 500, "Internal Server Error"),
    ],
)
async def test_http_errors_map_by_status(
    server: BackgroundServer, fault: str, error_class: ErrorClass, status: int, text: str
) -> None:
    err = await failure(adapter(server).generate(req(f"x [[fault:{fault}]]")))
    assert err.error_class is error_class
    assert err.status_code == status
    assert text in err.message
    assert err.billing is Billing.NOT_BILLED  # an error answer: HF ran nothing it bills


async def test_rate_limit_carries_the_wait_from_the_headers(server: BackgroundServer) -> None:
    BOARD.configure("hf", retry_after_s=7)
    err = await failure(adapter(server).generate(req("x [[fault:rate_limit]]")))
    assert err.error_class is ErrorClass.RATE_LIMITED
    assert err.status_code == 429
    assert err.retry_after_s == 7.0
    assert err.billing is Billing.NOT_BILLED


async def test_a_loading_model_is_unavailable_with_its_estimated_time(server: BackgroundServer) -> None:
    err = await failure(adapter(server).generate(req("x [[fault:loading]]")))
    assert err.error_class is ErrorClass.UNAVAILABLE
    assert err.status_code == 503
    assert err.retry_after_s == 20.0
    assert "currently loading" in err.message
    assert err.billing is Billing.NOT_BILLED


async def test_a_cold_start_answers_503_until_the_model_is_warm(
    server: BackgroundServer, emulator_app: Starlette
) -> None:
    emulator_app.state.hf.settings.cold_start_s = 30.0
    err = await failure(adapter(server).generate(req(model="cold/start-model")))
    assert err.error_class is ErrorClass.UNAVAILABLE
    assert err.retry_after_s is not None and 25 <= err.retry_after_s <= 30


async def test_a_hung_call_times_out_near_the_deadline(server: BackgroundServer) -> None:
    started = time.monotonic()
    err = await failure(adapter(server).generate(req("x [[fault:hang]]", timeout_s=1.5)))
    elapsed = time.monotonic() - started
    assert err.error_class is ErrorClass.TIMEOUT
    assert 1.4 <= elapsed < 3.0
    assert err.billing is Billing.UNKNOWN  # sent and never answered: HF may run it yet


async def test_calls_abandoned_at_the_deadline_end_quietly(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    err = await failure(adapter(server).generate(req("x [[fault:hang]]", num_images=2, timeout_s=1.0)))
    assert err.error_class is ErrorClass.TIMEOUT and err.billing is Billing.UNKNOWN
    # Let the abandoned worker threads end (at the client's timeout), their tasks finish and be collected.
    await asyncio.get_running_loop().shutdown_default_executor()
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert noisy == []


async def test_a_dead_host_is_unavailable_within_seconds() -> None:
    dead = HuggingFaceAdapter(AdapterConfig(api_key=TOKEN, base_url=f"http://127.0.0.1:{free_port()}"))
    started = time.monotonic()
    err = await failure(dead.generate(req(timeout_s=30)))
    assert err.error_class is ErrorClass.UNAVAILABLE
    assert time.monotonic() - started < 5
    assert err.billing is Billing.NOT_BILLED  # never connected


async def test_a_dropped_connection_is_unavailable(server: BackgroundServer) -> None:
    err = await failure(adapter(server).generate(req("x [[fault:drop]]")))
    assert err.error_class is ErrorClass.UNAVAILABLE
    assert err.billing is Billing.UNKNOWN  # sent, then the answer broke off


@pytest.mark.parametrize("fault", ["malformed", "not_an_image"])
async def test_an_answer_that_is_not_an_image_is_a_bad_response(server: BackgroundServer, fault: str) -> None:
    err = await failure(adapter(server).generate(req(f"x [[fault:{fault}]]")))
    assert err.error_class is ErrorClass.BAD_RESPONSE
    assert "not a usable image" in err.message
    assert err.billing is Billing.BILLED  # HF answered 200: it ran the call


def test_the_billing_of_several_calls() -> None:
    billed, unknown, free = Billing.BILLED, Billing.UNKNOWN, Billing.NOT_BILLED
    assert _attempt_billing([free, free]) is free
    assert _attempt_billing([free, billed]) is billed
    assert _attempt_billing([billed, unknown, free]) is unknown


# -- health ------------------------------------------------------------------------------------------------


async def test_health_probe_reads_model_info_without_inference(
    server: BackgroundServer, emulator_app: Starlette
) -> None:
    # A cold start would make any inference answer 503: the probe must not depend on (or trigger) one.
    emulator_app.state.hf.settings.cold_start_s = 30.0
    report = await adapter(server, model="Qwen/Qwen-Image").health_probe()
    assert report.ok, report
    assert "hf-inference" in report.detail


async def test_health_probe_reports_a_bad_token_an_outage_and_a_dead_host(server: BackgroundServer) -> None:
    bad = await adapter(server, token="hf_bad").health_probe()
    assert not bad.ok and bad.error_class is ErrorClass.AUTH
    BOARD.set_fault("hf", Fault.SERVER_ERROR)
    down = await adapter(server).health_probe()
    assert not down.ok and down.error_class is ErrorClass.UNAVAILABLE
    dead = HuggingFaceAdapter(AdapterConfig(api_key=TOKEN, base_url=f"http://127.0.0.1:{free_port()}"))
    unreachable = await dead.health_probe()
    assert not unreachable.ok and unreachable.error_class is ErrorClass.UNAVAILABLE


async def test_health_probe_of_an_endpoint_url_is_a_get(server: BackgroundServer) -> None:
    hf = adapter(server, base_url=None, model=f"{server.url}/")
    report = await hf.health_probe()
    assert report.ok, report
    assert "GET" in report.detail
    refused = await adapter(server, token="hf_bad", base_url=None, model=f"{server.url}/").health_probe()
    assert not refused.ok and refused.error_class is ErrorClass.AUTH
