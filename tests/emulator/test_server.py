"""The composed emulator server: mounts, the control API, and the fal queue emulator's wire behaviour."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from common.config import PROJECT_ROOT
from emulator.faults import Fault, FaultBoard
from emulator.runner import BackgroundServer, free_port, serve_in_thread
from emulator.server import create_emulator_app

HAS_GRADIO = importlib.util.find_spec("gradio") is not None
FAL = "/fal/fal-ai/qwen-image"
AUTH = {"Authorization": "Key test-key"}


@pytest.fixture(scope="module")
def board() -> FaultBoard:
    return FaultBoard()


@pytest.fixture(scope="module")
def app(board: FaultBoard) -> Starlette:
    return create_emulator_app(board)


@pytest.fixture(scope="module")
def server(app: Starlette) -> Iterator[BackgroundServer]:
    with serve_in_thread(app) as srv:
        yield srv


@pytest.fixture
def http(server: BackgroundServer, board: FaultBoard, app: Starlette) -> Iterator[httpx.Client]:
    # Queue positions count every request ahead: start each test with an empty fal queue.
    app.state.apps["fal"].state.emulator.requests.clear()
    board.reset()
    board.configure("fal", latency_s=0.05, queue_steps=1)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client
    board.reset()


def wait_completed(http: httpx.Client, status_url: str) -> httpx.Response:
    deadline = time.monotonic() + 5
    while True:
        response = http.get(status_url, params={"logs": "true"}, headers=AUTH)
        if response.json()["status"] == "COMPLETED":
            return response
        assert time.monotonic() < deadline, response.text
        time.sleep(0.02)


# -- composition ---------------------------------------------------------------------------------------------


def test_index_lists_every_mount(http: httpx.Client) -> None:
    index = http.get("/").json()
    mounts = index["mounts"]
    assert mounts["fal"]["path"] == "/fal"
    assert mounts["ideogram"]["path"] == "/ideogram"
    assert mounts["hf"]["path"] == "/hf"
    if HAS_GRADIO:
        assert mounts["qwen"]["path"] == "/qwen/"
    else:
        assert "gradio" in index["not_mounted"]["qwen"]
    assert set(index["faults"]) == {f.value for f in Fault}


@pytest.mark.skipif(not HAS_GRADIO, reason="the Qwen Space emulator needs the optional gradio package")
def test_the_gradio_space_works_under_its_prefix(server: BackgroundServer) -> None:
    from gradio_client import Client

    client = Client(server.url + "/qwen/", verbose=False)
    try:
        assert "/infer" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    finally:
        client.close()


def test_python_dash_m_emulator_serves(tmp_path: Any) -> None:
    port = free_port()
    log = (tmp_path / "emulator.log").open("w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--port", str(port)],
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                index = httpx.get(f"http://127.0.0.1:{port}/", timeout=1).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "emulator.log").read_text()
                assert time.monotonic() < deadline, "python -m emulator did not start within 30 s"
                time.sleep(0.1)
        assert "fal" in index["mounts"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


# -- control API ---------------------------------------------------------------------------------------------


def test_state_shows_knobs_faults_and_mounts(http: httpx.Client) -> None:
    fal = http.get("/_emulator/state").json()["providers"]["fal"]
    assert fal["mounted_at"] == "/fal"
    assert fal["latency_s"] == 0.05 and fal["queue_steps"] == 1
    assert fal["fault"] is None
    assert "hang" in fal["supported_faults"] and "quota" not in fal["supported_faults"]


def test_each_provider_lists_only_the_faults_it_acts_on(http: httpx.Client) -> None:
    providers = http.get("/_emulator/state").json()["providers"]
    assert "loading" in providers["hf"]["supported_faults"]
    assert "loading" not in providers["ideogram"]["supported_faults"]
    assert "quota" in providers["qwen"]["supported_faults"] and "auth" not in providers["qwen"]["supported_faults"]
    refused = http.post("/_emulator/faults", json={"provider": "ideogram", "fault": "loading"})
    assert refused.status_code == 400
    assert http.get("/_emulator/state").json()["providers"]["ideogram"]["fault"] is None


def test_a_standing_fault_hits_the_next_requests_then_clears(http: httpx.Client) -> None:
    set_fault = http.post("/_emulator/faults", json={"provider": "fal", "fault": "rate_limit", "count": 2})
    assert set_fault.status_code == 200
    assert set_fault.json()["providers"]["fal"]["fault"] == "rate_limit"
    codes = [http.post(FAL, json={"prompt": "p"}, headers=AUTH).status_code for _ in range(3)]
    assert codes == [429, 429, 200]
    assert http.get("/_emulator/state").json()["providers"]["fal"]["fault"] is None


def test_config_changes_knobs_and_reset_restores_them(http: httpx.Client, board: FaultBoard) -> None:
    response = http.post("/_emulator/config", json={"provider": "fal", "retry_after_s": 9, "concurrency": 3})
    assert response.status_code == 200
    assert board.get("fal").retry_after_s == 9 and board.get("fal").concurrency == 3
    http.post("/_emulator/faults", json={"provider": "ideogram", "fault": "hang"})
    http.post("/_emulator/reset")
    state = http.get("/_emulator/state").json()["providers"]
    assert state["fal"]["retry_after_s"] == 2 and state["fal"]["concurrency"] == 4
    assert state["ideogram"]["fault"] is None


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/_emulator/faults", {"provider": "openai", "fault": "auth"}, "provider"),
        ("/_emulator/faults", {"provider": "fal", "fault": "gremlins"}, "fault"),
        ("/_emulator/faults", {"provider": "fal", "fault": "quota"}, "fault"),  # a Space fault, not fal's
        ("/_emulator/faults", {"provider": "fal", "fault": "auth", "count": 0}, "count"),
        ("/_emulator/faults", {"provider": "fal", "fault": None, "count": 3}, "count"),
        ("/_emulator/faults", {"provider": "fal", "fault": "auth", "colour": "red"}, "colour"),
        ("/_emulator/config", {"provider": "fal", "warp_speed": 9}, "warp_speed"),
        ("/_emulator/config", {"provider": "fal", "latency_s": "fast"}, "latency_s"),
        ("/_emulator/config", {"provider": "fal", "latency_s": True}, "latency_s"),
        ("/_emulator/config", {"provider": "fal", "queue_steps": 1.5}, "queue_steps"),
        ("/_emulator/config", {"provider": "fal", "concurrency": 0}, "concurrency"),
        ("/_emulator/config", {"provider": "fal"}, "body"),
        ("/_emulator/config", ["fal"], "body"),
    ],
)
def test_bad_control_input_is_a_400_naming_the_field_and_changes_nothing(
    http: httpx.Client, path: str, body: Any, field: str
) -> None:
    before = http.get("/_emulator/state").json()
    response = http.post(path, json=body)
    assert response.status_code == 400
    assert response.json()["field"] == field
    assert response.json()["error"]
    assert http.get("/_emulator/state").json() == before


def test_control_body_that_is_not_json_is_a_400(http: httpx.Client) -> None:
    response = http.post("/_emulator/faults", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


# -- fal queue protocol ----------------------------------------------------------------------------------------


def test_fal_submit_status_result_round_trip(http: httpx.Client, server: BackgroundServer) -> None:
    submitted = http.post(FAL, json={"prompt": "p", "image_size": {"width": 320, "height": 200}}, headers=AUTH)
    assert submitted.status_code == 200
    body = submitted.json()
    request_id = body["request_id"]
    assert body["status"] == "IN_QUEUE" and body["queue_position"] == 1
    assert body["status_url"] == f"{server.url}{FAL}/requests/{request_id}/status"
    assert body["response_url"] == f"{server.url}{FAL}/requests/{request_id}"
    assert body["cancel_url"] == f"{server.url}{FAL}/requests/{request_id}/cancel"

    queued = http.get(body["status_url"], params={"logs": "false"}, headers=AUTH)
    assert queued.status_code == 202 and queued.json() == {"status": "IN_QUEUE", "queue_position": 0}
    running = http.get(body["status_url"], params={"logs": "false"}, headers=AUTH)
    assert running.status_code == 202 and running.json() == {"status": "IN_PROGRESS", "logs": None}

    done = wait_completed(http, body["status_url"])
    assert done.status_code == 200
    assert done.json()["metrics"]["inference_time"] >= 0.05
    assert {"message", "level", "source", "timestamp"} <= set(done.json()["logs"][0])

    result = http.get(body["response_url"], headers=AUTH)
    assert result.headers["x-fal-request-id"] == request_id
    assert result.headers["x-fal-billable-units"] == "0.064"
    output = result.json()
    image = output["images"][0]
    assert (image["width"], image["height"], image["content_type"]) == (320, 200, "image/png")
    assert output["has_nsfw_concepts"] == [False] and output["prompt"] == "p"
    assert http.get(image["url"]).content.startswith(b"\x89PNG")

    # Cancelling something finished is refused the way fal does it.
    cancel = http.put(body["cancel_url"], headers=AUTH)
    assert cancel.status_code == 400 and cancel.json() == {"status": "ALREADY_COMPLETED"}


def test_fal_cancel_while_queued(http: httpx.Client) -> None:
    body = http.post(FAL, json={"prompt": "p"}, headers=AUTH).json()
    cancel = http.put(body["cancel_url"], headers=AUTH)
    assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    assert http.get(body["response_url"], headers=AUTH).status_code == 400


def test_fal_validation_errors_have_fastapis_shape(http: httpx.Client) -> None:
    response = http.post(
        FAL, json={"prompt": "p", "num_images": 9, "image_size": {"width": 20000, "height": 10}}, headers=AUTH
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    locs = {tuple(d["loc"]) for d in detail}
    assert ("body", "num_images") in locs
    assert all({"loc", "msg", "type"} <= set(d) for d in detail)
    missing = http.post(FAL, json={}, headers=AUTH).json()["detail"]
    assert missing[0]["loc"] == ["body", "prompt"]


def test_fal_auth_unknown_app_and_unknown_request(http: httpx.Client) -> None:
    assert http.post(FAL, json={"prompt": "p"}).status_code == 401
    assert http.post(FAL, json={"prompt": "p"}, headers={"Authorization": "Bearer x"}).status_code == 401
    assert http.post("/fal/fal-ai/flux-pro", json={"prompt": "p"}, headers=AUTH).status_code == 404
    assert http.get(f"{FAL}/requests/nope/status", headers=AUTH).status_code == 404


def test_fal_request_timeout_header_expires_a_request_that_never_started(http: httpx.Client, board: FaultBoard) -> None:
    board.configure("fal", queue_steps=1000)
    body = http.post(FAL, json={"prompt": "p"}, headers={**AUTH, "X-Fal-Request-Timeout": "1.2"}).json()
    time.sleep(1.3)
    done = http.get(body["status_url"], headers=AUTH).json()
    assert done["status"] == "COMPLETED" and done["error_type"] == "request_timeout"
    result = http.get(body["response_url"], headers=AUTH)
    assert result.status_code == 504 and result.headers["x-fal-request-timeout-type"] == "user"


def test_fal_server_error_carries_fals_error_type_header(http: httpx.Client) -> None:
    body = http.post(FAL, json={"prompt": "p [[fault:server_error]]"}, headers=AUTH).json()
    assert wait_completed(http, body["status_url"]).json()["error_type"] == "runner_server_error"
    result = http.get(body["response_url"], headers=AUTH)
    assert result.status_code == 503
    assert result.headers["x-fal-error-type"].startswith("runner_")
    # It came from fal's app, not its ingress: fal-client must not retry it.
    assert "x-fal-request-id" in result.headers


def test_fal_a_request_nobody_polls_still_leaves_the_queue(http: httpx.Client, board: FaultBoard) -> None:
    board.configure("fal", queue_steps=1, latency_s=0.05)
    abandoned = http.post(FAL, json={"prompt": "p"}, headers=AUTH).json()
    assert abandoned["queue_position"] == 1
    time.sleep(0.6)  # one queue step (QUEUE_STEP_S) passes without a poll
    later = http.post(FAL, json={"prompt": "q"}, headers=AUTH).json()
    assert later["queue_position"] == 1  # only its own step left: nothing stuck ahead of it
    assert wait_completed(http, abandoned["status_url"]).json()["status"] == "COMPLETED"
