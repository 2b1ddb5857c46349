"""The one preparation step (core.generation.prepare): settings + price -> effective parameters, the adapter's
translation, the price version and the estimate; or the reasons a request cannot run. On both databases."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from common.config import PROJECT_ROOT
from common.errors import InvalidInput
from core import price_store, settings_service
from core.generation.prepare import NO_PRICE, NO_SETTINGS, PreparedRequest, prepare
from core.overview import PREVIEW_PROMPT, provider_overviews
from core.pricing import estimate_cost
from core.providers.base import (
    AdapterConfig,
    AdapterRequest,
    ConnectionMode,
    HealthReport,
    ProviderAdapter,
    ProviderResult,
    Translation,
)
from core.providers.fal import FalQwenAdapter
from core.security import Actor
from core.seed import seed_defaults
from core.settings import SOURCE_PROVIDER, SOURCE_REQUEST
from db.engine import transaction
from tests.dbfixtures import *  # noqa: F403

SYSTEM = Actor.system("prepare-test")


@pytest.fixture
def seeded(db_session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    seed_defaults(db_session_factory)
    return db_session_factory


def _fal_adapter() -> FalQwenAdapter:
    # Translation sends nothing; nothing listens on port 9 anyway.
    config = AdapterConfig(api_key="unused", base_url="http://127.0.0.1:9/fal", mode=ConnectionMode.EMULATOR)
    return FalQwenAdapter(config)


class _Refuses(ProviderAdapter):
    """An adapter whose provider cannot take the request (what fallback meets at some candidates)."""

    provider_id = "fal-qwen"

    def translate(self, request: AdapterRequest) -> Translation:
        raise InvalidInput("fal-qwen cannot take this request", {"image_size": "not on this provider"})

    async def generate(self, request: AdapterRequest, **_: Any) -> ProviderResult:
        raise AssertionError("never run")

    async def health_probe(self) -> HealthReport:
        raise AssertionError("never probed")


def test_a_valid_request_is_resolved_translated_priced_and_names_its_price_version(
    seeded: sessionmaker[Session],
) -> None:
    with transaction(seeded) as session:
        settings_service.update_provider_settings(session, SYSTEM, "fal-qwen", {"params": {"image_size": "square_hd"}})
    with seeded() as session:
        prepared = prepare(
            session,
            "fal-qwen",
            prompt="  a red fox in snow ",
            preset="Fast",
            overrides={"seed": 7, "num_images": 2},
            negative_prompt="blurry",
            adapter=_fal_adapter(),
        )
        price = price_store.active_price(session, "fal-qwen")
        stored = settings_service.get_provider_settings(session, "fal-qwen")
    assert price is not None
    assert prepared.valid and prepared.runnable and prepared.error is None and not prepared.field_errors
    assert prepared.settings == stored and prepared.global_settings_version == 1
    effective = prepared.effective
    assert effective is not None and effective.preset == "fast"
    assert effective.source_of("seed") == SOURCE_REQUEST and effective.source_of("negative_prompt") == SOURCE_REQUEST
    assert effective.source_of("image_size") == SOURCE_PROVIDER
    assert prepared.request is not None
    assert prepared.request.prompt == "a red fox in snow"
    assert prepared.request.params == effective.values()
    assert prepared.request.timeout_s == effective.request_timeout_s
    assert prepared.translation is not None
    assert prepared.translation.wire_params["seed"] == 7
    assert prepared.translation.wire_params["image_size"] == "square_hd"
    assert prepared.translation.wire_params["negative_prompt"] == "blurry"
    assert prepared.price_version_id == price.id
    expected = estimate_cost(price.price, provider_id="fal-qwen", params=effective.values())
    assert prepared.estimate == expected
    assert prepared.estimate.micro_usd == 41_943  # 2 x 1.048576 MP x $0.02 = $0.04194304, rounded once
    assert prepared.problems == ()


def test_invalid_parameters_come_back_as_field_errors_not_an_exception(seeded: sessionmaker[Session]) -> None:
    with seeded() as session:
        prepared = prepare(
            session, "fal-qwen", prompt="a fox", overrides={"guidance_scale": 25, "nope": 1}, adapter=_fal_adapter()
        )
    assert not prepared.valid and not prepared.runnable
    assert prepared.effective is None and prepared.request is None and prepared.translation is None
    assert prepared.estimate is None
    assert prepared.field_errors is not None and {"guidance_scale", "nope"} <= set(prepared.field_errors)
    refusal = prepared.refusal()
    assert isinstance(refusal, InvalidInput) and refusal.field_errors == dict(prepared.field_errors)
    assert any("do not validate" in problem for problem in prepared.problems)
    assert prepared.price_version_id is not None  # still known: the overview shows the price regardless


def test_an_unknown_provider_is_a_field_error(seeded: sessionmaker[Session]) -> None:
    with seeded() as session:
        prepared = prepare(session, "dall-e", prompt="a fox")
    assert prepared.field_errors is not None and "provider" in prepared.field_errors
    assert prepared.price is None and prepared.settings is None


def test_an_adapter_that_refuses_makes_the_request_invalid_but_still_priced(seeded: sessionmaker[Session]) -> None:
    refuses = _Refuses(AdapterConfig(mode=ConnectionMode.EMULATOR))
    with seeded() as session:
        prepared = prepare(session, "fal-qwen", prompt="a fox", adapter=refuses)
    assert not prepared.valid and prepared.request is None and prepared.translation is None
    assert prepared.field_errors == {"image_size": "not on this provider"}
    assert prepared.effective is not None and prepared.estimate is not None
    refusal = prepared.refusal()
    assert refusal is not None and "cannot take this request" in str(refusal)


def test_without_settings_or_price_the_catalog_defaults_resolve_but_nothing_is_runnable(
    db_session_factory: sessionmaker[Session],
) -> None:
    with db_session_factory() as session:  # never seeded
        prepared = prepare(session, "ideogram", prompt="a fox")
    assert prepared.valid and not prepared.runnable
    assert prepared.settings is None and prepared.global_settings_version == 0
    assert prepared.price is None and prepared.price_version_id is None and prepared.estimate is None
    assert prepared.problems == (NO_SETTINGS, NO_PRICE)


def test_priced_images_prices_that_many_without_changing_the_request(seeded: sessionmaker[Session]) -> None:
    with seeded() as session:
        four = prepare(session, "ideogram", prompt="a fox", overrides={"num_images": 4})
        one = prepare(session, "ideogram", prompt="a fox", overrides={"num_images": 4}, priced_images=1)
    assert four.estimate is not None and one.estimate is not None
    assert four.estimate.micro_usd == 4 * one.estimate.micro_usd == 240_000
    assert one.request is not None and one.request.params["num_images"] == 4


def test_a_deadline_given_replaces_the_settings_one(seeded: sessionmaker[Session]) -> None:
    with seeded() as session:
        given = prepare(session, "fal-qwen", prompt="a fox", timeout_s=12.5)
        default = prepare(session, "fal-qwen", prompt="a fox")
    assert given.request is not None and given.request.timeout_s == 12.5
    assert default.request is not None and default.effective is not None
    assert default.request.timeout_s == default.effective.request_timeout_s != 12.5


def test_a_stored_price_that_no_longer_validates_fails_only_the_estimate(seeded: sessionmaker[Session]) -> None:
    with transaction(seeded) as session:
        latest = price_store.latest_price_version(session, "huggingface")
        assert latest is not None
        from db.models import PriceVersion

        row = session.get(PriceVersion, latest.id)
        assert row is not None
        row.rule = {**row.rule, "usd_per_unit": "1E+1000"}
    with seeded() as session:
        prepared = prepare(session, "huggingface", prompt="a fox")
    assert prepared.valid and prepared.estimate is None and not prepared.runnable
    assert any(problem.startswith("cannot price these settings") for problem in prepared.problems)


def test_the_overview_shows_what_prepare_works_out(seeded: sessionmaker[Session]) -> None:
    with transaction(seeded) as session:
        settings_service.update_provider_settings(session, SYSTEM, "fal-qwen", {"params": {"num_images": 3}})
    with seeded() as session:
        overviews = {o.provider: o for o in provider_overviews(session)}
        prepared: dict[str, PreparedRequest] = {
            provider: prepare(session, provider, prompt=PREVIEW_PROMPT, priced_images=1) for provider in overviews
        }
    for provider, overview in overviews.items():
        assert overview.effective == prepared[provider].effective
        assert overview.one_image == prepared[provider].estimate
        assert overview.problems == list(prepared[provider].problems)
        price = prepared[provider].price
        assert overview.price_version == (price.version if price is not None else None)
    fal = overviews["fal-qwen"]
    assert fal.effective is not None and fal.effective.value_of("num_images") == 3
    assert fal.one_image is not None and fal.one_image.formatted == "$0.015729"  # one image, not three


def _calls_outside_prepare(name: str) -> list[str]:
    """Product modules that call `name` themselves instead of going through core.generation.prepare."""
    allowed = {
        PROJECT_ROOT / "core" / "generation" / "prepare.py",
        PROJECT_ROOT / "core" / "settings.py",
        PROJECT_ROOT / "core" / "pricing.py",
    }
    found = []
    for folder in ("core", "cli", "ui", "views", "pages", "db"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")) if (PROJECT_ROOT / folder).exists() else []:
            if path in allowed:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call):
                    func = node.func
                    called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                    if called == name:
                        found.append(f"{Path(path).relative_to(PROJECT_ROOT)}:{node.lineno}")
    return found


@pytest.mark.parametrize("name", ["resolve_effective", "estimate_cost"])
def test_resolving_and_estimating_happen_only_in_the_preparation_step(name: str) -> None:
    assert _calls_outside_prepare(name) == []
