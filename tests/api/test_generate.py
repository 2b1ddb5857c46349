"""POST /api/generate, GET /api/generations/{id}, GET /api/images/{id}: waiting and queued jobs, idempotent
retries, who may see what, and every refusal as problem details."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from api import routes_generate
from core import image_access
from core.generation import jobs
from db.models import ApiRateWindow, Generation, GenerationJob, Role, UsageAttempt
from tests.api.conftest import Api

PROBLEM = "application/problem+json"


def test_a_waiting_request_returns_the_images_cost_and_attempts(api: Api) -> None:
    token = api.token_for("ann")
    answer = api.client.post(
        "/api/generate",
        json={"prompt": "a red fox", "provider": "sandbox", "params": {"seed": 7}},
        headers=api.auth(token),
    )
    assert answer.status_code == 200, answer.text
    job = answer.json()
    assert job["status"] == "succeeded" and job["generation_id"] and job["error"] is None
    generation = job["generation"]
    assert generation["provider"] == "sandbox" and generation["seed"] == 7
    assert generation["attempts"][0]["status"] == "succeeded" and "cost" in generation
    assert "path" not in str(generation)  # server paths never leave the server
    [image] = job["images"]
    picture = api.client.get(image["url"], headers=api.auth(token))
    assert picture.status_code == 200 and picture.headers["content-type"] == image["media_type"]
    assert picture.content[:8] == b"\x89PNG\r\n\x1a\n" and len(picture.content) == image["size_bytes"]
    again = api.client.get(f"/api/generations/{job['id']}", headers=api.auth(token))
    assert again.status_code == 200 and again.json()["images"] == job["images"]


def test_a_waiting_request_is_answered_from_its_run_without_reading_it_back(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job that finished within the wait is answered from what generate() returned and the image rows its
    finishing transaction read; a later GET reads the same job from the database and says the same (only the
    timings differ: the run measured its own, the ledger keeps each attempt's in milliseconds)."""
    token = api.token_for("ann")

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the waiting POST read the job back")

    with monkeypatch.context() as patched:
        # Every way back to the job, its generation or its images (the last one as the route once imported it).
        patched.setattr(jobs, "get_job", no_read)
        patched.setattr(jobs, "load_result", no_read)
        patched.setattr(image_access, "generation_images", no_read)
        patched.setattr(routes_generate, "load_result", no_read, raising=False)
        answer = api.client.post(
            "/api/generate",
            json={"prompt": "a red fox", "provider": "fal-qwen", "params": {"seed": 7, "num_images": 2}},
            headers=api.auth(token),
        )
    assert answer.status_code == 200, answer.text
    posted = answer.json()
    assert posted["status"] == "succeeded" and [i["position"] for i in posted["images"]] == [0, 1]
    read = api.client.get(f"/api/generations/{posted['id']}", headers=api.auth(token)).json()
    for body in (posted, read):
        body["generation"].pop("timings")
    assert posted == read
    with api.factory() as session:
        job = session.get(GenerationJob, posted["id"])
        assert job is not None and job.token_id is not None  # the job names the token that asked for it


def test_a_request_core_refuses_or_a_token_over_its_limit_still_counts_and_queues_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admitting transaction (token, job, count) rolls back when core refuses the job or the token is over
    its limit; the request is counted all the same, and nothing is queued."""
    monkeypatch.setenv("IMAGEGATE_API_RATE_LIMIT", "2")
    token = api.token_for("ann")
    headers = {**api.auth(token), "Idempotency-Key": "order-7"}
    body = {"prompt": "a red fox", "provider": "sandbox", "wait": False}
    assert api.client.post("/api/generate", json=body, headers=headers).status_code == 202
    reused = api.client.post("/api/generate", json={**body, "prompt": "a blue fox"}, headers=headers)
    assert reused.status_code == 422  # refused by core, and counted: the limit of 2 is used up
    over = api.client.post("/api/generate", json=body, headers=api.auth(token))
    assert over.status_code == 429 and over.json()["limit_per_minute"] == 2
    assert api.client.post("/api/generate", json=body, headers=headers).status_code == 429
    with api.factory() as session:
        assert session.scalar(select(func.count()).select_from(GenerationJob)) == 1
        assert session.scalar(select(ApiRateWindow.requests)) == 4


def test_a_queued_request_is_accepted_at_once_and_finished_by_the_worker(api: Api) -> None:
    token = api.token_for("ann")
    answer = api.client.post(
        "/api/generate", json={"prompt": "a red fox", "provider": "sandbox", "wait": False}, headers=api.auth(token)
    )
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    assert answer.headers["location"] == f"/api/generations/{job_id}"
    deadline = time.monotonic() + 30
    while True:
        state = api.client.get(f"/api/generations/{job_id}", headers=api.auth(token)).json()
        if state["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state["status"] == "succeeded" and len(state["images"]) == 1


def test_a_retry_with_the_same_idempotency_key_returns_the_first_job(api: Api) -> None:
    token = api.token_for("ann")
    headers = {**api.auth(token), "Idempotency-Key": "order-42"}
    body = {"prompt": "a red fox", "provider": "sandbox"}
    first = api.client.post("/api/generate", json=body, headers=headers)
    second = api.client.post("/api/generate", json=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert first.json()["images"] == second.json()["images"]  # the repeat reads the first job back
    with api.factory() as session:
        assert session.scalar(select(func.count()).select_from(GenerationJob)) == 1
        assert session.scalar(select(func.count()).select_from(Generation)) == 1
        assert session.scalar(select(func.count()).select_from(UsageAttempt)) == 1
    reused = api.client.post("/api/generate", json={**body, "prompt": "a blue fox"}, headers=headers)
    assert reused.status_code == 422 and reused.headers["content-type"] == PROBLEM
    assert reused.json()["errors"] == [{"field": "idempotency_key", "detail": "already used for a different request"}]


def test_only_the_owner_and_staff_see_a_job_and_its_images(api: Api) -> None:
    ann, bob = api.token_for("ann"), api.token_for("bob")
    hero = api.token_for("hera", Role.HERO)
    job = api.client.post(
        "/api/generate", json={"prompt": "a fox", "provider": "sandbox"}, headers=api.auth(ann)
    ).json()
    url = job["images"][0]["url"]
    for path in (f"/api/generations/{job['id']}", url):
        assert api.client.get(path, headers=api.auth(hero)).status_code == 200
        refused = api.client.get(path, headers=api.auth(bob))
        assert refused.status_code == 404 and refused.headers["content-type"] == PROBLEM


def test_requests_without_a_usable_token_get_401_with_a_challenge(api: Api) -> None:
    body = {"prompt": "a fox", "provider": "sandbox"}
    for headers in ({}, {"Authorization": "Bearer igt_" + "x" * 43}, {"Authorization": "Basic abc"}):
        answer = api.client.post("/api/generate", json=body, headers=headers)
        assert answer.status_code == 401 and answer.headers["content-type"] == PROBLEM
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert answer.json()["type"] == "urn:imagegate:problem:unauthenticated"


def test_invalid_requests_are_problems_with_a_field_per_error(api: Api) -> None:
    token = api.token_for("ann")
    wrong = api.client.post(
        "/api/generate",
        json={"prompt": "a fox", "provider": "fal-qwen", "params": {"guidance_scale": 99}},
        headers=api.auth(token),
    )
    assert wrong.status_code == 422 and wrong.headers["content-type"] == PROBLEM
    assert "guidance_scale" in wrong.json()["detail"]
    malformed = api.client.post("/api/generate", json={"prompt": 5, "bogus": 1}, headers=api.auth(token))
    assert malformed.status_code == 422
    fields = {e["field"] for e in malformed.json()["errors"]}
    assert {"prompt", "bogus"} <= fields
    not_json = api.client.post(
        "/api/generate", content=b"{not json", headers={**api.auth(token), "Content-Type": "application/json"}
    )
    assert not_json.status_code == 422 and not_json.headers["content-type"] == PROBLEM


def test_a_body_over_the_limit_is_refused_before_it_is_read(api: Api) -> None:
    token = api.token_for("ann")
    huge = api.client.post("/api/generate", json={"prompt": "x" * 20_000}, headers=api.auth(token))
    assert huge.status_code == 413 and huge.headers["content-type"] == PROBLEM

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(40):
            yield b" " * 1024

    streamed = api.client.post(
        "/api/generate", content=chunks(), headers={**api.auth(token), "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413


def test_unknown_routes_and_methods_are_problems_too(api: Api) -> None:
    missing = api.client.get("/api/nothing-here")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    wrong_method = api.client.delete("/api/generate")
    assert wrong_method.status_code == 405 and wrong_method.headers["content-type"] == PROBLEM


def test_health_says_whether_the_database_answers_and_each_provider_state(api: Api) -> None:
    assert api.client.get("/api/health/live").json() == {"status": "ok"}
    ready = api.client.get("/api/health")
    assert ready.status_code == 200
    body = ready.json()
    assert body["database"] == "ok"
    states = {p["provider"]: p for p in body["providers"]}
    assert states["sandbox"]["mode"] == "sandbox" and states["fal-qwen"]["status"] == "not_configured"


def test_a_token_over_its_rate_limit_gets_429_with_retry_after(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGATE_API_RATE_LIMIT", "3")
    token = api.token_for("ann")
    answers = [api.client.get("/api/generations/none", headers=api.auth(token)) for _ in range(4)]
    assert [a.status_code for a in answers] == [404, 404, 404, 429]
    refused = answers[-1]
    assert refused.headers["content-type"] == PROBLEM and 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["limit_per_minute"] == 3
    other = api.token_for("bob")  # limits are per token
    assert api.client.get("/api/generations/none", headers=api.auth(other)).status_code == 404


def test_metrics_are_for_staff_and_count_requests_spend_breakers_and_jobs(api: Api) -> None:
    user, hero = api.token_for("ann"), api.token_for("hera", Role.HERO)
    made = api.client.post("/api/generate", json={"prompt": "a fox", "provider": "fal-qwen"}, headers=api.auth(user))
    assert made.status_code == 200
    cost = made.json()["generation"]["cost"]["actual_micro_usd"]
    assert cost > 0  # fal-qwen's would-be cost, run by the sandbox: simulated spend
    assert api.client.get("/metrics", headers=api.auth(user)).status_code == 403
    scraped = api.client.get("/metrics", headers=api.auth(hero))
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    text = scraped.text
    assert 'imagegate_http_requests_total{method="POST",route="/api/generate",status="200"} 1.0' in text
    assert 'imagegate_http_request_duration_seconds_bucket{le="+Inf",method="POST",route="/api/generate"} 1.0' in text
    assert 'imagegate_jobs{status="succeeded"} 1.0' in text
    assert 'imagegate_breaker_state{provider="fal-qwen"} 0.0' in text
    assert f'imagegate_spend_usd{{mode="simulated",period="day",provider="fal-qwen"}} {cost / 1e6}' in text
    assert 'imagegate_spend_usd{mode="live"' not in text  # nothing live was spent
    assert "/api/generations/" not in text  # route templates only, never raw paths
