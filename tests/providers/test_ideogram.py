"""IdeogramAdapter through `requests` against the Ideogram emulator, served on a loopback port."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest
import requests
from PIL import Image
from starlette.applications import Starlette
from starlette.routing import Mount

from common.errors import Billing, ErrorClass, InvalidInput, ProviderError
from core.providers.base import AdapterConfig, AdapterRequest, ConnectionMode, EventKind, ProgressEvent
from core.providers.http_headers import retry_after_seconds
from core.providers.ideogram import IdeogramAdapter, _HttpAnswer, error_message
from emulator.faults import BOARD, Fault
from emulator.ideogram import GENERATE_PATH, create_app
from emulator.runner import BackgroundServer, free_port, serve_in_thread

KEY = "test-ideogram-key"


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
    BOARD.configure("ideogram", latency_s=0.01)
    settings = emulator_app.state.ideogram.settings
    ttl = settings.url_ttl_s
    yield
    settings.url_ttl_s = ttl
    BOARD.reset()


def adapter(server: BackgroundServer, key: str | None = KEY, base_url: str | None = None) -> IdeogramAdapter:
    return IdeogramAdapter(
        AdapterConfig(api_key=key, base_url=base_url or server.url, mode=ConnectionMode.EMULATOR)
    )


def req(prompt: str = "a lighthouse at dusk", timeout_s: float = 10.0, **params: object) -> AdapterRequest:
    return AdapterRequest(prompt=prompt, params=params, timeout_s=timeout_s)


async def failure(coro: object) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await coro  # type: ignore[misc]
    return caught.value


# -- success -----------------------------------------------------------------------------------------------


async def test_generates_and_stores_real_images_of_the_requested_ratio(server: BackgroundServer) -> None:
    events: list[ProgressEvent] = []
    result = await adapter(server).generate(
        req(image_size="16:9", seed=42, num_images=2, rendering_speed="TURBO", negative_prompt="fog"),
        on_event=events.append,
    )
    assert result.provider == "ideogram"
    assert result.mode is ConnectionMode.EMULATOR
    assert result.seed == 42
    assert len(result.images) == 2
    for image in result.images:
        assert image.path.exists()
        assert (image.width, image.height) == (1312, 736)
        with Image.open(image.path) as opened:
            assert opened.format == "PNG"
            assert opened.size == (1312, 736)
        assert hashlib.sha256(image.path.read_bytes()).hexdigest() == image.sha256
    assert [m["seed"] for m in result.raw_metadata["images"]] == [42, 43]
    assert result.nsfw_flags == (False, False)
    assert result.translation.wire_params["aspect_ratio"] == "16x9"
    assert result.translation.exact
    assert [e.kind for e in events] == [EventKind.RUNNING, EventKind.DOWNLOADING, EventKind.COMPLETED]
    assert result.timings.total_s >= result.timings.run_s > 0
    assert result.billed_units == Decimal(2)  # Ideogram bills per image generated


async def test_same_seed_gives_the_same_image(server: BackgroundServer) -> None:
    first = await adapter(server).generate(req(image_size="1:1", seed=7))
    second = await adapter(server).generate(req(image_size="1:1", seed=7))
    other = await adapter(server).generate(req(image_size="1:1", seed=8))
    assert first.images[0].sha256 == second.images[0].sha256
    assert first.images[0].sha256 != other.images[0].sha256


async def test_dimensions_outside_the_list_use_the_nearest_resolution_and_say_so(server: BackgroundServer) -> None:
    result = await adapter(server).generate(req(image_size="1000x700", num_inference_steps=30, seed=1))
    wire = result.translation.wire_params
    assert "resolution" in wire and "aspect_ratio" not in wire
    w, h = (int(v) for v in wire["resolution"].split("x"))
    assert (result.images[0].width, result.images[0].height) == (w, h)
    assert not result.translation.exact
    assert any("1000x700" in note for note in result.translation.notes)
    assert any("num_inference_steps" in note for note in result.translation.notes)


def test_translate_refuses_bad_values_before_sending_anything() -> None:
    dead = IdeogramAdapter(AdapterConfig(api_key=KEY, base_url=f"http://127.0.0.1:{free_port()}"))
    for params, field in (
        ({"rendering_speed": "FLASH"}, "rendering_speed"),
        ({"num_images": 9}, "num_images"),
        ({"seed": -1}, "seed"),
        ({"image_size": "huge"}, "image_size"),
    ):
        with pytest.raises(InvalidInput) as caught:
            dead.translate(req(**params))
        assert list(caught.value.field_errors) == [field]
        assert field in caught.value.field_errors[field]
    with pytest.raises(InvalidInput) as empty:
        dead.translate(req("  "))
    assert list(empty.value.field_errors) == ["prompt"]


async def test_a_request_translate_refuses_fails_generate_unbilled_before_any_call() -> None:
    dead = IdeogramAdapter(AdapterConfig(api_key=KEY, base_url=f"http://127.0.0.1:{free_port()}"))
    err = await failure(dead.generate(req(num_images=9)))
    assert (err.error_class, err.billing) == (ErrorClass.VALIDATION, Billing.NOT_BILLED)
    assert "num_images" in err.message


async def test_some_unsafe_images_are_dropped_and_flagged(server: BackgroundServer) -> None:
    result = await adapter(server).generate(req("a beach [[unsafe:1]]", num_images=3, seed=5))
    assert len(result.images) == 2
    assert result.nsfw_flags == (True, False, False)
    assert result.seed == 6  # the first safe image's seed
    assert result.raw_metadata["unsafe_images"] == 1


# -- errors ------------------------------------------------------------------------------------------------


async def test_all_images_unsafe_is_a_safety_rejection(server: BackgroundServer) -> None:
    err = await failure(adapter(server).generate(req("a beach [[unsafe:8]]", num_images=2)))
    assert err.error_class is ErrorClass.SAFETY_REJECTED
    assert "2 image(s)" in err.message
    # They were generated (then flagged): billed, per image.
    assert (err.billing, err.billed_units) == (Billing.BILLED, Decimal(2))


async def test_bad_key_is_auth_with_the_error_shape_message(server: BackgroundServer) -> None:
    err = await failure(adapter(server, key="bad-key").generate(req()))
    assert err.error_class is ErrorClass.AUTH
    assert err.status_code == 401
    assert "Invalid or missing API key" in err.message  # from {"error": ...}
    assert err.billing is Billing.NOT_BILLED


async def test_missing_key_fails_without_calling(server: BackgroundServer) -> None:
    err = await failure(adapter(server, key=None).generate(req()))
    assert err.error_class is ErrorClass.AUTH
    assert err.status_code is None
    assert err.billing is Billing.NOT_BILLED


async def test_validation_is_read_from_the_problem_json_shape(server: BackgroundServer) -> None:
    err = await failure(adapter(server).generate(req("x [[fault:validation]]")))
    assert err.error_class is ErrorClass.VALIDATION
    assert err.status_code == 400
    assert "emulated validation failure" in err.message  # from {"detail": ...}
    assert err.billing is Billing.NOT_BILLED  # refused: nothing generated


async def test_safety_rejection_422(server: BackgroundServer) -> None:
    err = await failure(adapter(server).generate(req("x [[fault:safety]]")))
    assert err.error_class is ErrorClass.SAFETY_REJECTED
    assert err.status_code == 422
    assert "safety check" in err.message
    assert err.billing is Billing.NOT_BILLED  # the prompt was refused before anything was generated


async def test_rate_limit_fault_carries_retry_after(server: BackgroundServer) -> None:
    BOARD.configure("ideogram", retry_after_s=7)
    err = await failure(adapter(server).generate(req("x [[fault:rate_limit]]")))
    assert err.error_class is ErrorClass.RATE_LIMITED
    assert err.status_code == 429
    assert err.retry_after_s == 7.0
    assert err.billing is Billing.NOT_BILLED


async def test_requests_over_the_concurrency_limit_get_429(server: BackgroundServer) -> None:
    BOARD.configure("ideogram", concurrency=1, latency_s=0.5)
    ideogram = adapter(server)
    outcomes = await asyncio.gather(
        ideogram.generate(req(seed=1)), ideogram.generate(req(seed=2)), return_exceptions=True
    )
    errors = [o for o in outcomes if isinstance(o, ProviderError)]
    assert len(errors) == 1, outcomes
    assert errors[0].error_class is ErrorClass.RATE_LIMITED
    assert "in flight" in errors[0].message


async def test_server_error_is_unavailable(server: BackgroundServer) -> None:
    err = await failure(adapter(server).generate(req("x [[fault:server_error]]")))
    assert err.error_class is ErrorClass.UNAVAILABLE
    assert err.status_code == 500
    assert err.billing is Billing.NOT_BILLED


async def test_a_hung_request_times_out_near_the_deadline(server: BackgroundServer) -> None:
    started = time.monotonic()
    err = await failure(adapter(server).generate(req("x [[fault:hang]]", timeout_s=1.5)))
    elapsed = time.monotonic() - started
    assert err.error_class is ErrorClass.TIMEOUT
    assert 1.4 <= elapsed < 3.0
    assert err.billing is Billing.UNKNOWN  # sent: Ideogram may be generating it still


async def test_a_dead_host_is_unavailable_within_seconds() -> None:
    dead = IdeogramAdapter(AdapterConfig(api_key=KEY, base_url=f"http://127.0.0.1:{free_port()}"))
    started = time.monotonic()
    err = await failure(dead.generate(req(timeout_s=30)))
    assert err.error_class is ErrorClass.UNAVAILABLE
    assert time.monotonic() - started < 5
    assert err.billing is Billing.NOT_BILLED  # never connected: nothing sent


async def test_a_dropped_connection_is_unavailable(server: BackgroundServer) -> None:
    err = await failure(adapter(server).generate(req("x [[fault:drop]]")))
    assert err.error_class is ErrorClass.UNAVAILABLE
    assert err.billing is Billing.UNKNOWN  # the request reached Ideogram; its answer did not come back


async def test_garbage_json_is_a_bad_response(server: BackgroundServer) -> None:
    err = await failure(adapter(server).generate(req("x [[fault:malformed]]")))
    assert err.error_class is ErrorClass.BAD_RESPONSE
    assert err.status_code == 200
    # Ideogram answers 200 only after generating: billed, for a number of images nobody could read.
    assert (err.billing, err.billed_units) == (Billing.BILLED, None)


async def test_an_image_that_404s_after_a_successful_generate_is_billed_per_image(server: BackgroundServer) -> None:
    err = await failure(adapter(server).generate(req("x [[fault:image_404]]", num_images=3)))
    assert err.error_class is ErrorClass.BAD_RESPONSE
    assert err.status_code == 404
    # Ideogram generated (and billed) three images before their URLs failed us.
    assert (err.billing, err.billed_units) == (Billing.BILLED, Decimal(3))


async def test_bytes_that_are_not_an_image_are_a_bad_response(server: BackgroundServer) -> None:
    err = await failure(adapter(server).generate(req("x [[fault:not_an_image]]")))
    assert err.error_class is ErrorClass.BAD_RESPONSE
    assert "not a usable image" in err.message
    assert (err.billing, err.billed_units) == (Billing.BILLED, Decimal(1))


async def test_an_expired_image_url_is_a_bad_response(
    server: BackgroundServer, emulator_app: Starlette
) -> None:
    # URLs that are already stale when the answer arrives: the download is, in effect, too late.
    emulator_app.state.ideogram.settings.url_ttl_s = -1
    err = await failure(adapter(server).generate(req(seed=3)))
    assert err.error_class is ErrorClass.BAD_RESPONSE
    assert err.status_code == 403
    assert (err.billing, err.billed_units) == (Billing.BILLED, Decimal(1))


def test_error_bodies_of_both_shapes_give_the_message() -> None:
    problem = b'{"type":"about:blank","title":"Bad Request","detail":"seed is out of range","status":400}'
    assert error_message(problem) == "Bad Request: seed is out of range"
    assert error_message(b'{"error": "resolution and aspect_ratio cannot both be set"}') == (
        "resolution and aspect_ratio cannot both be set"
    )
    assert error_message(b'{"error": {"message": "nested"}}') == "nested"
    assert error_message(b"<html>oops</html>") == "<html>oops</html>"
    assert error_message(b"") == "(empty body)"


def test_415_is_reported_as_our_bug_not_the_users(server: BackgroundServer) -> None:
    err = adapter(server)._http_error(_HttpAnswer(415, {}, b'{"error": "Unsupported Media Type"}'))
    assert err.error_class is ErrorClass.BAD_RESPONSE
    assert "Imagegate bug" in err.message


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (402, ErrorClass.QUOTA_EXCEEDED),
        (403, ErrorClass.AUTH),
        (404, ErrorClass.BAD_RESPONSE),
        (409, ErrorClass.VALIDATION),
        (503, ErrorClass.UNAVAILABLE),
    ],
)
def test_statuses_the_emulator_does_not_send_still_map(
    server: BackgroundServer, status: int, error_class: ErrorClass
) -> None:
    answer = _HttpAnswer(status, {"Retry-After": "3"}, b'{"title": "Nope", "detail": "no", "status": 1}')
    err = adapter(server)._http_error(answer)
    assert err.error_class is error_class
    assert err.status_code == status
    assert err.billing is Billing.NOT_BILLED  # an error answer: nothing generated
    if status == 503:
        assert err.retry_after_s == 3.0


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    seconds = retry_after_seconds(in_a_minute)
    assert seconds is not None and 55 <= seconds <= 61


# -- emulator fidelity --------------------------------------------------------------------------------------


def test_emulator_refuses_urlencoded_and_json_bodies_with_415(server: BackgroundServer) -> None:
    url = server.url + GENERATE_PATH
    form = requests.post(url, headers={"Api-Key": KEY}, data={"prompt": "a cat"}, timeout=5)
    as_json = requests.post(url, headers={"Api-Key": KEY}, json={"prompt": "a cat"}, timeout=5)
    assert form.status_code == 415 and "multipart" in form.json()["error"]
    assert as_json.status_code == 415


def test_emulator_refuses_resolution_with_aspect_ratio_in_the_error_shape(server: BackgroundServer) -> None:
    parts = {"prompt": (None, "a cat"), "resolution": (None, "1024x1024"), "aspect_ratio": (None, "1x1")}
    answer = requests.post(server.url + GENERATE_PATH, headers={"Api-Key": KEY}, files=parts, timeout=5)
    assert answer.status_code == 400
    assert answer.json() == {"error": "resolution and aspect_ratio cannot both be set"}


def test_emulator_image_urls_are_signed(server: BackgroundServer) -> None:
    parts = {"prompt": (None, "a cat"), "seed": (None, "1")}
    answer = requests.post(server.url + GENERATE_PATH, headers={"Api-Key": KEY}, files=parts, timeout=5)
    url = answer.json()["data"][0]["url"]
    assert requests.get(url, timeout=5).status_code == 200
    assert requests.get(url.replace("sig=", "sig=0"), timeout=5).status_code == 403


def test_emulator_mounted_under_a_prefix_serves_images_under_it() -> None:
    app = Starlette(routes=[Mount("/ideogram", app=create_app(BOARD))])
    with serve_in_thread(app) as mounted:
        parts = {"prompt": (None, "a cat"), "seed": (None, "1")}
        answer = requests.post(
            mounted.url + "/ideogram" + GENERATE_PATH, headers={"Api-Key": KEY}, files=parts, timeout=5
        )
        url = answer.json()["data"][0]["url"]
        assert url.startswith(mounted.url + "/ideogram/")
        assert requests.get(url, timeout=5).status_code == 200


# -- health ------------------------------------------------------------------------------------------------


async def test_health_probe_is_ok_and_generates_nothing(
    server: BackgroundServer, emulator_app: Starlette
) -> None:
    state = emulator_app.state.ideogram
    kept_before = len(state.images)
    report = await adapter(server).health_probe()
    assert report.ok, report
    assert report.error_class is None
    assert len(state.images) == kept_before


async def test_health_probe_reports_a_bad_key_and_an_outage(server: BackgroundServer) -> None:
    bad = await adapter(server, key="bad-key").health_probe()
    assert not bad.ok and bad.error_class is ErrorClass.AUTH
    BOARD.set_fault("ideogram", Fault.SERVER_ERROR)
    down = await adapter(server).health_probe()
    assert not down.ok and down.error_class is ErrorClass.UNAVAILABLE
    dead = IdeogramAdapter(AdapterConfig(api_key=KEY, base_url=f"http://127.0.0.1:{free_port()}"))
    unreachable = await dead.health_probe()
    assert not unreachable.ok and unreachable.error_class is ErrorClass.UNAVAILABLE
