"""Contract tests: FalQwenAdapter through the real fal-client 1.0.3 against the fal queue emulator.

Faults come from the emulator (`[[fault:NAME]]` in the prompt); fal-client's own retry loop (10 tries, about
50 s) is bounded by each attempt's deadline, or by `few_fal_client_retries` where a test shows that the
adapter's own polling, not fal-client's, carries a job through a failure."""

from __future__ import annotations

import asyncio
import base64
import time
from decimal import Decimal
from typing import Any

import fal_client.client as fal_wire
import httpx
import pytest
from PIL import Image

from common.errors import Billing, ErrorClass, InvalidInput, ProviderError
from core.images import store_image
from core.providers.base import AdapterConfig, AdapterRequest, ConnectionMode, EventKind, ProgressEvent
from core.providers.fal import APP_ID, FalQwenAdapter, _Attempt, _FalTransport, _Phase
from core.providers.http_download import Billed, decode_data_uri, download_image
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


def job_status(server: BackgroundServer, request_id: str) -> dict[str, Any]:
    """What the emulated fal queue says about a job, asked directly (not through the adapter)."""
    answer = httpx.get(f"{server.url}/fal/{APP_ID}/requests/{request_id}/status", headers=raw_headers(), timeout=5)
    body: dict[str, Any] = answer.json()
    return body


def jobs_created(server: BackgroundServer) -> int:
    count: int = httpx.get(f"{server.url}/fal/", timeout=5).json()["requests"]
    return count


def submit_raw(server: BackgroundServer, prompt: str, **params: Any) -> str:
    """A job submitted with plain HTTP, as another process (or one that has since died) would have."""
    answer = httpx.post(
        f"{server.url}/fal/{APP_ID}", json={"prompt": prompt, **params}, headers=raw_headers(), timeout=5
    )
    request_id: str = answer.json()["request_id"]
    return request_id


@pytest.fixture
def few_fal_client_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """fal-client sends a failed poll again up to 10 times by itself; with one try only, whatever carries the
    job through a failure is the adapter's own polling."""
    monkeypatch.setattr(fal_wire, "MAX_ATTEMPTS", 1)


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
    # fal's pricing notes say a 422 "may" be billed, without saying when: nobody can know, so unknown.
    assert err.billing is Billing.UNKNOWN and err.billed_units is None


async def test_all_images_flagged_is_a_safety_rejection(emulator_server: BackgroundServer) -> None:
    err = await expect_error(
        make_adapter(emulator_server).generate(req("x [[fault:safety]]")), ErrorClass.SAFETY_REJECTED
    )
    assert err.provider_request_id
    # The flagged output was generated, and fal reported the units it bills for it.
    assert err.billing is Billing.BILLED and err.billed_units == Decimal("0.262144")


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
    assert err.billing is Billing.NOT_BILLED  # fal refused the submit: no job


async def test_runner_failure_is_unavailable(emulator_server: BackgroundServer) -> None:
    err = await expect_error(
        make_adapter(emulator_server).generate(req("x [[fault:server_error]]")), ErrorClass.UNAVAILABLE
    )
    assert err.status_code == 503
    assert "runner_server_error" in err.message
    assert err.billing is Billing.NOT_BILLED  # a 5xx is never billed


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
    assert "last seen running" in err.message and "cancelled at fal" in err.message
    assert err.billing is Billing.UNKNOWN  # it ran for a while: whether fal bills that, nobody here knows
    status = job_status(emulator_server, ids[0])
    assert status["status"] == "COMPLETED"
    assert status["error_type"] == "request_cancelled"


@pytest.mark.parametrize(
    ("fault", "needle", "units"),
    [
        # A 200 whose body is cut short: fal produced (and billed) the output, it did not say how much.
        (Fault.MALFORMED, "JSONDecodeError", None),
        # fal reported the units it bills, then the image is gone or broken: the error carries them.
        (Fault.IMAGE_404, "HTTP 404", Decimal("0.262144")),
        (Fault.NOT_AN_IMAGE, "not a usable image", Decimal("0.262144")),
    ],
)
async def test_broken_answers_after_a_completed_job_are_billed_bad_responses(
    emulator_server: BackgroundServer, fault: Fault, needle: str, units: Decimal | None
) -> None:
    err = await expect_error(
        make_adapter(emulator_server).generate(req(f"x [[fault:{fault.value}]]")), ErrorClass.BAD_RESPONSE
    )
    assert needle in err.message
    assert err.provider_request_id
    assert err.billing is Billing.BILLED
    assert err.billed_units == units


async def test_a_submit_whose_answer_was_lost_is_not_sent_again(emulator_server: BackgroundServer) -> None:
    # The emulator queues the job, then drops the connection before its answer is complete. fal-client would
    # send the POST again (up to 10 times), each time starting another paid job whose id nobody learns.
    before = jobs_created(emulator_server)
    started = time.monotonic()
    err = await expect_error(
        make_adapter(emulator_server).generate(req("x [[fault:drop]]", timeout_s=30)), ErrorClass.UNAVAILABLE
    )
    assert time.monotonic() - started < 3  # at once, not at the deadline
    assert jobs_created(emulator_server) - before == 1
    assert "RemoteProtocolError" in err.message and "not sent again" in err.message
    assert err.billing is Billing.UNKNOWN  # a job may run at fal, and we do not know its id
    assert err.provider_request_id is None


async def test_a_dead_host_is_unavailable_within_seconds() -> None:
    adapter = make_adapter(f"http://127.0.0.1:{free_port()}/fal")
    started = time.monotonic()
    err = await expect_error(adapter.generate(req(timeout_s=60)), ErrorClass.UNAVAILABLE)
    assert time.monotonic() - started < 3  # fal-client alone retries a refused connection for ~44 s
    assert "cannot connect" in err.message
    assert err.billing is Billing.NOT_BILLED  # no connection, nothing sent


# -- a job outlives our connection to it ---------------------------------------------------------------------


@pytest.mark.parametrize("fault", [Fault.STATUS_ERROR, Fault.STATUS_DROP])
async def test_failed_status_polls_do_not_end_a_running_job(
    emulator_server: BackgroundServer, emulator_board: FaultBoard, few_fal_client_retries: None, fault: Fault
) -> None:
    # While the job runs, its status polls answer 503 (or lose their connection); the paid job runs on, so
    # the adapter polls again, with backoff, and collects it.
    emulator_board.configure("fal", latency_s=0.3)
    result = await make_adapter(emulator_server).generate(req(f"x [[fault:{fault.value}]]", seed=4))
    assert len(result.images) == 1
    assert result.billed_units == Decimal("0.262144")


async def test_a_deadline_after_connection_errors_keeps_the_cause_and_cancels_the_job(
    emulator_server: BackgroundServer, emulator_board: FaultBoard
) -> None:
    # Every status poll of the running job loses its connection until the deadline; the cancel then works.
    emulator_board.configure("fal", latency_s=30)
    ids: list[str] = []
    err = await expect_error(
        make_adapter(emulator_server).generate(req("x [[fault:status_drop]]", timeout_s=1.5), on_request_id=ids.append),
        ErrorClass.UNAVAILABLE,
    )
    assert "RemoteProtocolError" in err.message  # the cause, not what the cancel call answered
    assert "cancelled at fal" in err.message
    assert err.provider_request_id == ids[0]
    assert err.billing is Billing.UNKNOWN
    assert job_status(emulator_server, ids[0])["error_type"] == "request_cancelled"


async def test_a_completed_job_whose_result_cannot_be_fetched_is_not_called_queued_or_running(
    emulator_server: BackgroundServer,
) -> None:
    ids: list[str] = []
    err = await expect_error(
        make_adapter(emulator_server).generate(req("x [[fault:result_drop]]", timeout_s=1.5), on_request_id=ids.append),
        ErrorClass.UNAVAILABLE,
    )
    assert "after the job completed, while fetching its result" in err.message
    assert "RemoteProtocolError" in err.message
    assert "queue" not in err.message and "running" not in err.message
    assert err.billing is Billing.BILLED  # fal bills a completed job; it never got to say how much
    assert err.provider_request_id == ids[0]
    status = job_status(emulator_server, ids[0])
    assert status["status"] == "COMPLETED" and "error_type" not in status  # nothing tried to cancel it


async def test_an_answer_we_cannot_follow_gives_up_and_cancels_the_job(
    emulator_server: BackgroundServer, emulator_board: FaultBoard, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fal-client 1.0.3 raises ValueError on a status value it does not know (say fal adds one): the adapter
    # cannot follow the job any more, so it gives up, and the paid job must not run on unwatched.
    emulator_board.configure("fal", latency_s=30)
    parse = fal_wire._BaseRequestHandle._parse_status

    def newer_fal(self: Any, data: Any) -> Any:
        if data.get("status") == "IN_PROGRESS":
            raise ValueError("Unknown status: WARMING_UP")
        return parse(self, data)

    monkeypatch.setattr(fal_wire._BaseRequestHandle, "_parse_status", newer_fal)
    ids: list[str] = []
    err = await expect_error(
        make_adapter(emulator_server).generate(req(), on_request_id=ids.append), ErrorClass.BAD_RESPONSE
    )
    assert "WARMING_UP" in err.message and "cancelled at fal" in err.message
    assert err.billing is Billing.UNKNOWN and err.provider_request_id == ids[0]
    assert job_status(emulator_server, ids[0])["error_type"] == "request_cancelled"


async def test_a_cancelled_task_cancels_its_job_at_fal(
    emulator_server: BackgroundServer, emulator_board: FaultBoard
) -> None:
    # The caller stops waiting (shutdown, a page rerun): nobody will collect the job, so it is cancelled.
    emulator_board.configure("fal", latency_s=30)
    submitted: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(make_adapter(emulator_server).generate(req(), on_request_id=submitted.put_nowait))
    request_id = await asyncio.wait_for(submitted.get(), timeout=5)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert job_status(emulator_server, request_id)["error_type"] == "request_cancelled"


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
    assert err.billing is Billing.NOT_BILLED
    # A second cancel finds it completed (as cancelled), and says so. A look-up costs nothing.
    again = await expect_error(make_adapter(emulator_server).cancel(request_id), ErrorClass.VALIDATION)
    assert "already completed" in again.message
    assert again.billing is Billing.NOT_BILLED
    unknown = await expect_error(make_adapter(emulator_server).cancel("no-such-request"), ErrorClass.VALIDATION)
    assert unknown.billing is Billing.NOT_BILLED


@pytest.mark.parametrize("fault", [Fault.HANG, Fault.CANCELLED_499, Fault.CANCELLED_400])
async def test_every_way_fal_reports_a_cancelled_job_is_cancelled_and_not_billed(
    emulator_server: BackgroundServer, emulator_board: FaultBoard, fault: Fault
) -> None:
    # hang: status COMPLETED with error_type request_cancelled. cancelled_499 / cancelled_400: a plain COMPLETED,
    # then the result answers 499, or 400 "Request was cancelled" without an error type.
    emulator_board.configure("fal", latency_s=30)
    submitted: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(
        make_adapter(emulator_server).generate(req(f"x [[fault:{fault.value}]]"), on_request_id=submitted.put_nowait)
    )
    request_id = await asyncio.wait_for(submitted.get(), timeout=5)
    await make_adapter(emulator_server).cancel(request_id)
    err = await expect_error(asyncio.wait_for(task, timeout=5), ErrorClass.CANCELLED)
    assert err.billing is Billing.NOT_BILLED
    assert err.provider_request_id == request_id


async def test_resume_after_a_restart_collects_the_result(
    emulator_server: BackgroundServer, emulator_board: FaultBoard
) -> None:
    # Submitted by a process that has since died, with only the id persisted.
    emulator_board.configure("fal", latency_s=0.4)
    request_id = submit_raw(emulator_server, "a lighthouse at dusk", image_size="square", seed=99)

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
    assert err.billing is Billing.NOT_BILLED  # a look-up


async def test_resume_of_a_job_still_running_at_its_deadline_leaves_it_running(
    emulator_server: BackgroundServer, emulator_board: FaultBoard
) -> None:
    emulator_board.configure("fal", latency_s=30)
    request_id = submit_raw(emulator_server, "p", image_size="square")
    err = await expect_error(make_adapter(emulator_server).resume(request_id, req(timeout_s=1)), ErrorClass.TIMEOUT)
    assert err.billing is Billing.UNKNOWN and err.provider_request_id == request_id
    assert job_status(emulator_server, request_id)["status"] in ("IN_QUEUE", "IN_PROGRESS")


async def test_a_failing_request_id_callback_cancels_the_request_and_propagates(
    emulator_server: BackgroundServer,
) -> None:
    ids: list[str] = []

    def on_request_id(request_id: str) -> None:
        ids.append(request_id)
        raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError, match="database is locked"):
        await make_adapter(emulator_server).generate(req(), on_request_id=on_request_id)
    assert job_status(emulator_server, ids[0])["error_type"] == "request_cancelled"


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
    with pytest.raises(InvalidInput) as caught:
        make_adapter("http://127.0.0.1:1/fal").translate(AdapterRequest("p", params))
    assert list(caught.value.field_errors) == list(params)
    assert needle in caught.value.field_errors[next(iter(params))]


def test_translation_takes_its_ranges_from_the_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    # One validator, the catalog's ranges: tightening the catalog tightens what the adapter sends.
    from dataclasses import replace

    from core.catalog import FAL_QWEN

    adapter = make_adapter("http://127.0.0.1:1/fal")
    assert adapter.translate(AdapterRequest("p", {"guidance_scale": 12.0})).wire_params["guidance_scale"] == 12.0
    tight = replace(FAL_QWEN.params["guidance_scale"], maximum=10.0)
    monkeypatch.setitem(FAL_QWEN.params, "guidance_scale", tight)
    with pytest.raises(InvalidInput) as caught:
        adapter.translate(AdapterRequest("p", {"guidance_scale": 12.0}))
    assert "maximum of 10" in caught.value.field_errors["guidance_scale"]


async def test_a_request_translate_refuses_fails_generate_unbilled_before_any_call() -> None:
    # A closed port: had the adapter tried to connect, this would be UNAVAILABLE instead.
    adapter = make_adapter(f"http://127.0.0.1:{free_port()}/fal")
    err = await expect_error(adapter.generate(req(num_images=9)), ErrorClass.VALIDATION)
    assert err.billing is Billing.NOT_BILLED
    assert "num_images" in err.message


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
    billed = Billed(Billing.BILLED, Decimal(2))
    stored = await download_image(good, provider="x", timeout_s=5, billed=billed, root=tmp_path)
    assert stored == store_image(png, root=tmp_path)
    for bad in ("data:image/png;base64,@@@", "file:///etc/passwd", "data:text/plain,hello"):
        with pytest.raises(ProviderError) as caught:
            await download_image(bad, provider="x", timeout_s=5, billed=billed, root=tmp_path)
        assert caught.value.error_class is ErrorClass.BAD_RESPONSE
        assert (caught.value.billing, caught.value.billed_units) == (Billing.BILLED, Decimal(2))
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
    transport = _FalTransport("http://127.0.0.1:1/fal")
    mapped = adapter._map(exc, _Attempt(request_id="rid", phase=_Phase.RUNNING), transport)
    assert mapped.error_class is error_class, mapped
    assert mapped.provider_request_id == "rid"
    assert adapter._map(MissingCredentialsError("none"), _Attempt(), transport).error_class is ErrorClass.AUTH


@pytest.mark.parametrize(
    ("exc", "phase", "billing"),
    [
        # Answers to the submit: fal refused it, so no job exists (but for a 422, which fal "may" bill).
        (_http_error(400, {"detail": "bad"}), _Phase.SUBMITTING, Billing.NOT_BILLED),
        (_http_error(401, {"detail": "no"}), _Phase.SUBMITTING, Billing.NOT_BILLED),
        (_http_error(422, {"detail": [{"loc": ["body", "x"], "msg": "m"}]}), _Phase.SUBMITTING, Billing.UNKNOWN),
        (_http_error(503, {"detail": "down"}), _Phase.SUBMITTING, Billing.NOT_BILLED),
        # The same answers while a job runs say nothing of it: its billing is unknown.
        (_http_error(401, {"detail": "no"}), _Phase.RUNNING, Billing.UNKNOWN),
        (ValueError("Unknown status: EXPLODED"), _Phase.QUEUED, Billing.UNKNOWN),
        # What fal says about the job itself decides.
        (_http_error(499, {"detail": "Request was cancelled"}), _Phase.RUNNING, Billing.NOT_BILLED),
        (_http_error(400, {"detail": "Request was cancelled"}), _Phase.FAILED, Billing.NOT_BILLED),
        (_http_error(504, {"detail": "x", "error_type": "startup_timeout"}), _Phase.QUEUED, Billing.NOT_BILLED),
        (_http_error(503, {"detail": "x", "error_type": "runner_server_error"}), _Phase.FAILED, Billing.NOT_BILLED),
        # After a COMPLETED without error, the output exists and fal bills it.
        (KeyError("images"), _Phase.COMPLETED, Billing.BILLED),
    ],
)
def test_billing_is_decided_per_case(exc: Exception, phase: _Phase, billing: Billing) -> None:
    adapter = make_adapter("http://127.0.0.1:1/fal")
    transport = _FalTransport("http://127.0.0.1:1/fal")
    transport.submit_sent = True
    attempt = _Attempt(request_id=None if phase is _Phase.SUBMITTING else "rid", phase=phase)
    assert adapter._map(exc, attempt, transport).billing is billing


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
    mapped = make_adapter("http://127.0.0.1:1/fal")._map(exc, _Attempt(), _FalTransport("http://127.0.0.1:1/fal"))
    assert mapped.error_class is ErrorClass.VALIDATION
    assert mapped.message == "fal rejected the input: image_size.width: too big; num_images: too many"
