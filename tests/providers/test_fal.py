"""Contract tests: FalQwenAdapter through the real fal-client 1.0.3 against the fal queue emulator."""

from __future__ import annotations

import asyncio
import base64
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest
from PIL import Image

from common.errors import ErrorClass, ProviderError
from core.images import store_image
from core.providers.base import AdapterConfig, AdapterRequest, ConnectionMode, EventKind, ProgressEvent
from core.providers.fal import APP_ID, FalQwenAdapter
from core.providers.http_download import decode_data_uri, download_image
from core.providers.http_headers import retry_after_seconds
from emulator.faults import Fault, FaultBoard
from emulator.images import render_image
from emulator.runner import BackgroundServer, free_port

KEY = "test-key"


@pytest.fixture(autouse=True)
def fast_fal(emulator_board: FaultBoard) -> None:
    emulator_board.configure("fal", latency_s=0.05, queue_steps=2)


def make_adapter(server: BackgroundServer | str, *, key: str | None = KEY, poll: float = 0.02) -> FalQwenAdapter:
    base = server if isinstance(server, str) else server.url + "/fal"
    return FalQwenAdapter(AdapterConfig(api_key=key, base_url=base, mode=ConnectionMode.EMULATOR, poll_interval_s=poll))


def req(prompt: str = "a lighthouse at dusk", timeout_s: float = 10.0, **params: Any) -> AdapterRequest:
    return AdapterRequest(prompt=prompt, params={"image_size": "square", **params}, timeout_s=timeout_s)


async def expect_error(coro: Any, error_class: ErrorClass) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await coro
    assert caught.value.error_class is error_class, str(caught.value)
    assert caught.value.provider == "fal-qwen"
    return caught.value


def raw_headers() -> dict[str, str]:
    return {"Authorization": f"Key {KEY}"}


# -- success -------------------------------------------------------------------------------------------------


async def test_generates_a_real_png_of_the_requested_size_with_billing_and_seed(
    emulator_server: BackgroundServer,
) -> None:
    result = await make_adapter(emulator_server).generate(req(seed=1234, image_size="square_hd"))

    assert len(result.images) == 1
    image = result.images[0]
    data = image.path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(image.path) as img:
        assert img.size == (1024, 1024)
    assert (image.width, image.height, image.format) == (1024, 1024, "png")
    # Exactly what the emulator renders for this prompt and seed: the adapter did not alter the bytes.
    assert data == render_image("a lighthouse at dusk", 1234, 1024, 1024, "png")
    assert result.billed_units == Decimal("1.048576")
    assert result.seed == 1234
    assert result.provider_request_id
    assert result.mode is ConnectionMode.EMULATOR
    assert result.nsfw_flags == (False,)
    assert result.translation.exact
    t = result.timings
    assert t.total_s >= t.submit_s + t.queue_s + t.run_s + t.download_s - 1e-6
    assert t.run_s > 0 and t.download_s > 0


async def test_custom_dimensions_jpeg_and_several_images(emulator_server: BackgroundServer) -> None:
    result = await make_adapter(emulator_server).generate(
        req(image_size="640x480", output_format="jpeg", num_images=3, seed=5)
    )
    assert result.translation.wire_params["image_size"] == {"width": 640, "height": 480}
    assert [(i.width, i.height, i.format) for i in result.images] == [(640, 480, "jpeg")] * 3
    assert len({i.sha256 for i in result.images}) == 3  # seed, seed+1, seed+2: three different images
    assert result.billed_units == Decimal("0.9216")  # 3 x 0.3072 MP


async def test_unseeded_requests_report_the_seed_fal_chose(emulator_server: BackgroundServer) -> None:
    first = await make_adapter(emulator_server).generate(req())
    assert isinstance(first.seed, int)
    again = await make_adapter(emulator_server).generate(req(seed=first.seed))
    assert again.images[0].sha256 == first.images[0].sha256


async def test_progress_events_in_order_with_the_request_id_first(emulator_server: BackgroundServer) -> None:
    seen: list[Any] = []

    async def on_request_id(request_id: str) -> None:
        seen.append(("id", request_id))

    result = await make_adapter(emulator_server).generate(req(), on_event=seen.append, on_request_id=on_request_id)

    assert seen[0] == ("id", result.provider_request_id)
    events: list[ProgressEvent] = seen[1:]
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.SUBMITTED
    assert kinds[-2:] == [EventKind.DOWNLOADING, EventKind.COMPLETED]
    queued = [e.queue_position for e in events if e.kind is EventKind.QUEUED]
    assert queued == [2, 1]  # queue_steps=2 polls in the queue, counting down to 1 = next to run
    first_running = kinds.index(EventKind.RUNNING)
    assert kinds.index(EventKind.QUEUED) < first_running < kinds.index(EventKind.DOWNLOADING)
    logs = [line for e in events if e.kind is EventKind.RUNNING for line in e.logs]
    assert any("Denoising step" in line for line in logs)
    assert len(logs) == len(set(logs))  # each log line reported once
    assert all(e.provider_request_id == result.provider_request_id for e in events)


async def test_requests_over_the_concurrency_limit_wait_with_growing_positions(
    emulator_server: BackgroundServer, emulator_board: FaultBoard
) -> None:
    emulator_board.configure("fal", concurrency=1, queue_steps=0, latency_s=0.3)
    positions: dict[int, list[int]] = {0: [], 1: [], 2: []}

    async def one(n: int) -> Any:
        def on_event(event: ProgressEvent) -> None:
            if event.kind is EventKind.QUEUED and event.queue_position is not None:
                positions[n].append(event.queue_position)

        await asyncio.sleep(0.05 * n)  # a fixed submission order
        return await make_adapter(emulator_server).generate(req(f"prompt {n}"), on_event=on_event)

    results = await asyncio.gather(*(one(n) for n in range(3)))
    assert all(len(r.images) == 1 for r in results)
    assert max(positions[2]) > max(positions[1], default=0) >= 0
    assert max(positions[2]) >= 2
    # The last one waited for two runs of 0.3 s each in turn.
    assert results[2].timings.queue_s > 0.3


# -- errors --------------------------------------------------------------------------------------------------


async def test_refused_key_is_auth(emulator_server: BackgroundServer) -> None:
    err = await expect_error(make_adapter(emulator_server, key="invalid-key").generate(req()), ErrorClass.AUTH)
    assert err.status_code == 401
    await expect_error(make_adapter(emulator_server).generate(req("x [[fault:auth]]")), ErrorClass.AUTH)


async def test_missing_key_is_auth_without_any_call() -> None:
    # A closed port: had the adapter tried to connect, this would be UNAVAILABLE instead.
    adapter = make_adapter(f"http://127.0.0.1:{free_port()}/fal", key=None)
    err = await expect_error(adapter.generate(req()), ErrorClass.AUTH)
    assert "FAL_KEY" in err.message


async def test_validation_names_the_field_from_fals_detail_list(emulator_server: BackgroundServer) -> None:
    err = await expect_error(
        make_adapter(emulator_server).generate(req("x [[fault:validation]]")), ErrorClass.VALIDATION
    )
    assert err.status_code == 422
    assert err.message.startswith("fal rejected the input: prompt: ")
    assert err.billable  # fal may bill a 422


async def test_all_images_flagged_is_a_safety_rejection(emulator_server: BackgroundServer) -> None:
    err = await expect_error(
        make_adapter(emulator_server).generate(req("x [[fault:safety]]")), ErrorClass.SAFETY_REJECTED
    )
    assert err.provider_request_id


async def test_partly_flagged_keeps_the_clean_images_and_flags_the_result(emulator_server: BackgroundServer) -> None:
    result = await make_adapter(emulator_server).generate(req("x [[fault:safety]]", num_images=2, seed=3))
    assert result.nsfw_flags == (True, False)  # per output, as fal reported them
    assert len(result.images) == 1
    with Image.open(result.images[0].path) as img:
        assert img.convert("L").getextrema() != (0, 0)  # the kept one is not the blanked one
    assert result.raw_metadata["filtered_nsfw"] == 1


async def test_safety_checker_off_means_nothing_is_flagged(emulator_server: BackgroundServer) -> None:
    result = await make_adapter(emulator_server).generate(req("x [[fault:safety]]", enable_safety_checker=False))
    assert result.nsfw_flags == (False,)
    assert len(result.images) == 1


async def test_rate_limit_is_reported_at_once_with_retry_after(
    emulator_server: BackgroundServer, emulator_board: FaultBoard
) -> None:
    emulator_board.configure("fal", retry_after_s=7)
    started = time.monotonic()
    err = await expect_error(
        make_adapter(emulator_server).generate(req("x [[fault:rate_limit]]")), ErrorClass.RATE_LIMITED
    )
    # fal-client alone would retry a 429 for about 49 s.
    assert time.monotonic() - started < 2
    assert err.retry_after_s == 7
    assert err.status_code == 429


async def test_runner_failure_is_unavailable(emulator_server: BackgroundServer) -> None:
    err = await expect_error(
        make_adapter(emulator_server).generate(req("x [[fault:server_error]]")), ErrorClass.UNAVAILABLE
    )
    assert err.status_code == 503
    assert "runner_server_error" in err.message
    assert not err.billable


async def test_a_hung_request_times_out_at_the_deadline_and_is_cancelled(emulator_server: BackgroundServer) -> None:
    ids: list[str] = []
    started = time.monotonic()
    err = await expect_error(
        make_adapter(emulator_server).generate(req("x [[fault:hang]]", timeout_s=1.0), on_request_id=ids.append),
        ErrorClass.TIMEOUT,
    )
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 3.5
    assert err.provider_request_id == ids[0]
    status = httpx.get(
        f"{emulator_server.url}/fal/{APP_ID}/requests/{ids[0]}/status", headers=raw_headers(), timeout=5
    ).json()
    assert status["status"] == "COMPLETED"
    assert status["error_type"] == "request_cancelled"


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        (Fault.MALFORMED, "JSONDecodeError"),
        (Fault.IMAGE_404, "HTTP 404"),
        (Fault.NOT_AN_IMAGE, "not a usable image"),
    ],
)
async def test_broken_answers_are_bad_responses(emulator_server: BackgroundServer, fault: Fault, needle: str) -> None:
    err = await expect_error(
        make_adapter(emulator_server).generate(req(f"x [[fault:{fault.value}]]")), ErrorClass.BAD_RESPONSE
    )
    assert needle in err.message
    assert err.provider_request_id


async def test_one_dropped_connection_is_retried_by_fal_client(
    emulator_server: BackgroundServer, emulator_board: FaultBoard
) -> None:
    emulator_board.set_fault("fal", Fault.DROP, count=1)
    result = await make_adapter(emulator_server).generate(req())
    assert len(result.images) == 1
    assert emulator_board.get("fal").fault is None  # the drop was used up by the first submit


async def test_connections_that_keep_dropping_are_unavailable_by_the_deadline(
    emulator_server: BackgroundServer,
) -> None:
    started = time.monotonic()
    err = await expect_error(
        make_adapter(emulator_server).generate(req("x [[fault:drop]]", timeout_s=1.5)), ErrorClass.UNAVAILABLE
    )
    assert time.monotonic() - started < 3
    assert "RemoteProtocolError" in err.message


async def test_a_dead_host_is_unavailable_within_seconds() -> None:
    adapter = make_adapter(f"http://127.0.0.1:{free_port()}/fal")
    started = time.monotonic()
    err = await expect_error(adapter.generate(req(timeout_s=60)), ErrorClass.UNAVAILABLE)
    assert time.monotonic() - started < 3  # fal-client alone retries a refused connection for ~44 s
    assert "cannot connect" in err.message


# -- cancel and resume ---------------------------------------------------------------------------------------


async def test_cancel_from_another_instance_ends_a_running_generate(emulator_server: BackgroundServer) -> None:
    submitted: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(
        make_adapter(emulator_server).generate(req("x [[fault:hang]]"), on_request_id=submitted.put_nowait)
    )
    request_id = await asyncio.wait_for(submitted.get(), timeout=5)
    await make_adapter(emulator_server).cancel(request_id)

    err = await expect_error(asyncio.wait_for(task, timeout=5), ErrorClass.CANCELLED)
    assert err.provider_request_id == request_id
    # A second cancel finds it completed (as cancelled), and says so.
    again = await expect_error(make_adapter(emulator_server).cancel(request_id), ErrorClass.VALIDATION)
    assert "already completed" in again.message


async def test_resume_after_a_restart_collects_the_result(
    emulator_server: BackgroundServer, emulator_board: FaultBoard
) -> None:
    emulator_board.configure("fal", latency_s=0.4)
    submitted: asyncio.Queue[str] = asyncio.Queue()
    first = make_adapter(emulator_server)
    task = asyncio.create_task(first.generate(req(seed=99), on_request_id=submitted.put_nowait))
    request_id = await asyncio.wait_for(submitted.get(), timeout=5)
    # The "process" dies: the task is cancelled and the adapter dropped, with only the id persisted.
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    del first

    events: list[ProgressEvent] = []
    result = await make_adapter(emulator_server).resume(request_id, req(seed=99), on_event=events.append)
    assert result.provider_request_id == request_id
    assert result.seed == 99
    assert result.billed_units == Decimal("0.262144")
    assert result.images[0].path.read_bytes() == render_image("a lighthouse at dusk", 99, 512, 512, "png")
    assert events[-1].kind is EventKind.COMPLETED


async def test_resume_of_an_unknown_id_is_a_clear_validation_error(emulator_server: BackgroundServer) -> None:
    err = await expect_error(make_adapter(emulator_server).resume("no-such-request", req()), ErrorClass.VALIDATION)
    assert "no-such-request" in err.message


async def test_a_failing_request_id_callback_cancels_the_request_and_propagates(
    emulator_server: BackgroundServer,
) -> None:
    ids: list[str] = []

    def on_request_id(request_id: str) -> None:
        ids.append(request_id)
        raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError, match="database is locked"):
        await make_adapter(emulator_server).generate(req(), on_request_id=on_request_id)
    status = httpx.get(
        f"{emulator_server.url}/fal/{APP_ID}/requests/{ids[0]}/status", headers=raw_headers(), timeout=5
    ).json()
    assert status["error_type"] == "request_cancelled"


# -- sync mode -------------------------------------------------------------------------------------------------


async def test_sync_mode_images_arrive_as_data_uris_and_are_stored(emulator_server: BackgroundServer) -> None:
    result = await make_adapter(emulator_server).generate(req(sync_mode=True, seed=8))
    assert result.images[0].path.read_bytes() == render_image("a lighthouse at dusk", 8, 512, 512, "png")
    # fal keeps no history for sync_mode: the request cannot be read again.
    await expect_error(
        make_adapter(emulator_server).resume(result.provider_request_id or "", req()), ErrorClass.VALIDATION
    )


def test_emulator_sync_mode_result_holds_data_uris(emulator_server: BackgroundServer) -> None:
    base = f"{emulator_server.url}/fal/{APP_ID}"
    with httpx.Client(headers=raw_headers(), timeout=5) as http:
        submitted = http.post(base, json={"prompt": "p", "image_size": "square", "sync_mode": True}).json()
        deadline = time.monotonic() + 5
        while http.get(submitted["status_url"]).json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        output = http.get(submitted["response_url"]).json()
    url = output["images"][0]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]).startswith(b"\x89PNG")


# -- translation ---------------------------------------------------------------------------------------------


def test_translation_fills_catalog_defaults_not_fals() -> None:
    wire = make_adapter("http://127.0.0.1:1/fal").translate(AdapterRequest("p", {})).wire_params
    assert wire == {
        "prompt": "p",
        "image_size": "landscape_4_3",
        "num_inference_steps": 25,
        "guidance_scale": 3.0,
        "num_images": 1,
        "enable_safety_checker": True,
        "sync_mode": False,
        "acceleration": "none",
        "output_format": "png",
    }


def test_translation_notes_what_it_changed() -> None:
    adapter = make_adapter("http://127.0.0.1:1/fal")
    t = adapter.translate(
        AdapterRequest(
            "p",
            {"image_size": "16:9", "num_inference_steps": 1, "rendering_speed": "TURBO", "negative_prompt": "blur"},
        )
    )
    assert not t.exact
    assert t.wire_params["num_inference_steps"] == 2
    assert t.wire_params["negative_prompt"] == "blur"
    size = t.wire_params["image_size"]
    assert isinstance(size, dict) and size["width"] > size["height"]
    joined = " | ".join(t.notes)
    assert "16:9" in joined
    assert "raised to 2" in joined
    assert "rendering_speed is not a fal-qwen parameter" in joined


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"image_size": "banana"}, "not understood"),
        ({"image_size": "20000x20000"}, "outside"),
        ({"num_images": 9}, "num_images"),
        ({"seed": "abc"}, "seed"),
        ({"acceleration": "ludicrous"}, "acceleration"),
        ({"sync_mode": "yes"}, "sync_mode"),
    ],
)
def test_translation_refuses_values_fal_cannot_take(params: dict[str, Any], needle: str) -> None:
    with pytest.raises(ProviderError) as caught:
        make_adapter("http://127.0.0.1:1/fal").translate(AdapterRequest("p", params))
    assert caught.value.error_class is ErrorClass.VALIDATION
    assert needle in caught.value.message


# -- health ------------------------------------------------------------------------------------------------


async def test_health_probe(emulator_server: BackgroundServer) -> None:
    ok = await make_adapter(emulator_server).health_probe()
    assert ok.ok and ok.error_class is None
    refused = await make_adapter(emulator_server, key="invalid-key").health_probe()
    assert not refused.ok and refused.error_class is ErrorClass.AUTH
    missing = await make_adapter(emulator_server, key=None).health_probe()
    assert not missing.ok and missing.error_class is ErrorClass.AUTH
    dead = await make_adapter(f"http://127.0.0.1:{free_port()}/fal").health_probe()
    assert not dead.ok and dead.error_class is ErrorClass.UNAVAILABLE
    assert dead.latency_s < 3


# -- small pieces -----------------------------------------------------------------------------------------------


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_seconds("12") == 12
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 <= (retry_after_seconds(in_a_minute) or 0) <= 61


async def test_downloader_refuses_what_is_not_a_fetchable_image(tmp_path: Any) -> None:
    png = render_image("p", 1, 8, 8)
    good = "data:image/png;base64," + base64.b64encode(png).decode()
    stored = await download_image(good, provider="x", timeout_s=5, root=tmp_path)
    assert stored == store_image(png, root=tmp_path)
    for bad in ("data:image/png;base64,@@@", "file:///etc/passwd", "data:text/plain,hello"):
        with pytest.raises(ProviderError) as caught:
            await download_image(bad, provider="x", timeout_s=5, root=tmp_path)
        assert caught.value.error_class is ErrorClass.BAD_RESPONSE
    with pytest.raises(ValueError, match="more than"):
        decode_data_uri("data:image/png;base64," + "A" * 400, max_bytes=100)


def _http_error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Exception:
    import fal_client

    response = httpx.Response(status, json=body, headers=headers, request=httpx.Request("GET", "https://x/"))
    return fal_client.FalClientHTTPError(
        body.get("detail", ""), status, dict(response.headers), response=response, error_type=body.get("error_type")
    )


@pytest.mark.parametrize(
    ("exc", "error_class"),
    [
        (_http_error(403, {"detail": "forbidden"}), ErrorClass.AUTH),
        (_http_error(504, {"detail": "timed out", "error_type": "request_timeout"}), ErrorClass.TIMEOUT),
        (_http_error(504, {"detail": "x"}, {"X-Fal-Request-Timeout-Type": "user"}), ErrorClass.TIMEOUT),
        (_http_error(502, {"detail": "bad gateway"}), ErrorClass.UNAVAILABLE),
        (_http_error(400, {"detail": "cancelled", "error_type": "request_cancelled"}), ErrorClass.CANCELLED),
        (_http_error(418, {"detail": "teapot"}), ErrorClass.BAD_RESPONSE),
        (ValueError("Unknown status: EXPLODED"), ErrorClass.BAD_RESPONSE),
        (KeyError("request_id"), ErrorClass.BAD_RESPONSE),
        (httpx.ReadTimeout("slow"), ErrorClass.TIMEOUT),
        (httpx.RemoteProtocolError("eof"), ErrorClass.UNAVAILABLE),
    ],
)
def test_every_failure_maps_to_one_error_class(exc: Exception, error_class: ErrorClass) -> None:
    from fal_client.auth import MissingCredentialsError

    adapter = make_adapter("http://127.0.0.1:1/fal")
    mapped = adapter._map(exc, "rid")
    assert mapped.error_class is error_class, mapped
    assert mapped.provider_request_id == "rid"
    assert adapter._map(MissingCredentialsError("none"), None).error_class is ErrorClass.AUTH


def test_validation_message_lists_each_field_of_a_422() -> None:
    exc = _http_error(
        422,
        {
            "detail": [
                {"loc": ["body", "image_size", "width"], "msg": "too big", "type": "less_than_equal"},
                {"loc": ["body", "num_images"], "msg": "too many", "type": "less_than_equal"},
            ]
        },
    )
    mapped = make_adapter("http://127.0.0.1:1/fal")._map(exc, None)
    assert mapped.error_class is ErrorClass.VALIDATION
    assert mapped.message == "fal rejected the input: image_size.width: too big; num_images: too many"
