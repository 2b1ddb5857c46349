"""The admin endpoints: staff only (core decides from the database), the same validation, versions and audit as
the console, pagination, and the spend, budget, alert, webhook and recommendation answers core gives."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core import audit
from core.security import Actor
from db.models import Role
from tests.api.conftest import Api

PROBLEM = "application/problem+json"
STAFF_ONLY = [
    ("get", "/api/admin/provider-settings"),
    ("get", "/api/admin/provider-usage"),
    ("get", "/api/admin/provider-costs"),
    ("get", "/api/admin/budgets"),
    ("get", "/api/admin/webhooks"),
    ("get", "/api/admin/recommendations"),
    ("get", "/api/admin/provider-health"),
]


@pytest.mark.parametrize(("method", "path"), STAFF_ONLY)
def test_a_user_token_is_refused_and_a_hero_token_served(api: Api, method: str, path: str) -> None:
    user = api.token_for("uma")
    refused = api.client.request(method, path, headers=api.auth(user))
    assert refused.status_code == 403 and refused.headers["content-type"] == PROBLEM
    # An ADMIN's token scoped to USER is a USER in core.
    scoped = api.token_for("root", Role.ADMIN, token_role=Role.USER)
    assert api.client.request(method, path, headers=api.auth(scoped)).status_code == 403
    if path != "/api/admin/webhooks":  # webhooks are ADMIN only
        hero = api.token_for("hera", Role.HERO)
        assert api.client.request(method, path, headers=api.auth(hero)).status_code == 200


def test_provider_settings_versions_conflicts_and_audit(api: Api) -> None:
    admin = api.auth(api.token_for("root", Role.ADMIN))
    current = api.client.get("/api/admin/provider-settings/qwen", headers=admin)
    assert current.status_code == 200, current.text
    settings, version = current.json()["settings"], current.json()["version"]
    again = api.client.post(
        "/api/admin/provider-settings", json={"provider": "qwen", "settings": settings}, headers=admin
    )
    assert again.status_code == 409 and again.headers["content-type"] == PROBLEM

    saved = api.client.put(
        "/api/admin/provider-settings/qwen",
        json={"settings": {**settings, "priority": 77}, "comment": "api test", "expected_version": version},
        headers=admin,
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["version"] == version + 1
    assert {"field": "priority", "before": settings["priority"], "after": 77} in saved.json()["changes"]
    stale = api.client.put(
        "/api/admin/provider-settings/qwen",
        json={"settings": {**settings, "priority": 78}, "expected_version": version},
        headers=admin,
    )
    assert stale.status_code == 409
    invalid = api.client.put(
        "/api/admin/provider-settings/fal-qwen",
        json={"settings": {"params": {"guidance_scale": 99}}},
        headers=admin,
    )
    assert invalid.status_code == 422 and any("guidance_scale" in e["field"] for e in invalid.json()["errors"])
    history = api.client.get("/api/admin/provider-settings/qwen/versions", headers=admin).json()
    assert history[0]["version"] == version + 1 and history[0]["comment"] == "api test"
    with api.factory() as session:
        [entry] = audit.list_entries(session, Actor.system("t"), target_id="qwen", limit=1)
    assert entry.actor_name == "root" and entry.action == "provider_settings.update"


def test_usage_is_paginated_newest_first_with_filters(api: Api) -> None:
    user = api.auth(api.token_for("ann"))
    for seed in range(5):
        made = api.client.post(
            "/api/generate", json={"prompt": "fox", "provider": "sandbox", "params": {"seed": seed}}, headers=user
        )
        assert made.status_code == 200
    hero = api.auth(api.token_for("hera", Role.HERO))
    first = api.client.get("/api/admin/provider-usage", params={"limit": 2}, headers=hero).json()
    assert len(first["attempts"]) == 2 and first["next_before_id"] == first["attempts"][-1]["id"]
    second = api.client.get(
        "/api/admin/provider-usage", params={"limit": 2, "before_id": first["next_before_id"]}, headers=hero
    ).json()
    third = api.client.get(
        "/api/admin/provider-usage", params={"limit": 2, "before_id": second["next_before_id"]}, headers=hero
    ).json()
    ids = [a["id"] for page in (first, second, third) for a in page["attempts"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 5 and third["next_before_id"] is None
    assert api.client.get("/api/admin/provider-usage", params={"provider": "ideogram"}, headers=hero).json() == {
        "attempts": [],
        "next_before_id": None,
    }
    wrong = api.client.get("/api/admin/provider-usage", params={"status": "bogus"}, headers=hero)
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "status"


def test_costs_budgets_alerts_webhooks_and_recommendations(api: Api) -> None:
    admin = api.auth(api.token_for("root", Role.ADMIN))
    made = api.client.post("/api/generate", json={"prompt": "fox", "provider": "fal-qwen"}, headers=admin)
    cost = made.json()["generation"]["cost"]["actual_micro_usd"]
    today = datetime.now(UTC).date().isoformat()
    report = api.client.get(
        "/api/admin/provider-costs", params={"from": today, "to": today, "by": "provider"}, headers=admin
    ).json()
    [row] = [r for r in report["rows"] if r["key"] == "fal-qwen"]
    assert (row["spend_mode"], row["actual_micro_usd"], row["images"]) == ("simulated", cost, 1)

    budget = api.client.post(
        "/api/admin/budgets",
        json={"name": "team", "scope": "global", "period": "monthly", "limit_micro_usd": 10 * cost},
        headers=admin,
    )
    assert budget.status_code == 201, budget.text
    listed = {b["name"]: b for b in api.client.get("/api/admin/budgets", headers=admin).json()}
    assert listed["team"]["periods"]["simulated"]["limit_micro_usd"] == 10 * cost
    assert listed["team"]["forecast"]["budget_id"] == budget.json()["id"]
    assert listed["team"]["thresholds"] == [50, 80, 100]
    thresholds = api.client.put(
        f"/api/admin/budgets/{budget.json()['id']}/thresholds", json={"thresholds": [90, 25]}, headers=admin
    )
    assert thresholds.json() == [25, 90]

    created = api.client.post(
        "/api/admin/webhooks", json={"name": "ops", "url": "https://hooks.example.com/imagegate"}, headers=admin
    )
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    assert secret and len(secret) >= 32
    listed_hooks = api.client.get("/api/admin/webhooks", headers=admin)
    assert listed_hooks.status_code == 200 and secret not in listed_hooks.text
    refused = api.client.post("/api/admin/webhooks", json={"name": "x", "url": "ftp://nope"}, headers=admin)
    assert refused.status_code == 422
    assert api.client.get("/api/admin/alerts", headers=admin).status_code == 200
    advice = api.client.get("/api/admin/recommendations", headers=admin).json()
    assert advice["spend_mode"] == "live" and isinstance(advice["recommendations"], list)
    health = {h["provider"]: h for h in api.client.get("/api/admin/provider-health", headers=admin).json()}
    assert health["fal-qwen"]["mode"] == "sandbox" and health["fal-qwen"]["breaker"]["state"] == "closed"


def test_provider_health_never_shows_a_key(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDEOGRAM_API_KEY", "ideo-very-secret-key-0123456789")
    hero = api.auth(api.token_for("hera", Role.HERO))
    answer = api.client.get("/api/admin/provider-health", headers=hero)
    assert answer.status_code == 200
    [ideogram] = [h for h in answer.json() if h["provider"] == "ideogram"]
    assert ideogram["mode"] == "live" and "very-secret" not in answer.text and "0123456789" not in answer.text
