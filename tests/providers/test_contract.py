"""The contract every adapter keeps, checked for each: what translate() raises, and where its ranges come from.

Fallback calls `translate()` for every candidate provider and skips those that refuse, so every adapter must
refuse the same way: `InvalidInput` with field errors, never a ProviderError (nothing was sent). `generate()`
turns the same refusal into a VALIDATION ProviderError that was not billed, before any connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

from common.errors import Billing, ErrorClass, InvalidInput, ProviderError
from core.catalog import COMMON_PARAMS, PROVIDERS
from core.providers.base import AdapterConfig, AdapterRequest, ConnectionMode, ProviderAdapter
from core.providers.fal import FalQwenAdapter
from core.providers.huggingface import HuggingFaceAdapter
from core.providers.ideogram import IdeogramAdapter
from core.providers.qwen_space import QwenSpaceAdapter
from core.providers.sandbox import SandboxAdapter
from core.settings import GlobalSettings
from emulator.runner import free_port


def _dead(cls: type[ProviderAdapter], path: str = "") -> Callable[[], ProviderAdapter]:
    """An adapter pointed at a closed port: a call that tried to connect would fail as UNAVAILABLE."""

    def build() -> ProviderAdapter:
        url = f"http://127.0.0.1:{free_port()}{path}"
        return cls(AdapterConfig(api_key="key", base_url=url, mode=ConnectionMode.EMULATOR))

    return build


ADAPTERS: dict[str, Callable[[], ProviderAdapter]] = {
    "fal-qwen": _dead(FalQwenAdapter, "/fal"),
    "ideogram": _dead(IdeogramAdapter),
    "huggingface": _dead(HuggingFaceAdapter),
    "qwen": _dead(QwenSpaceAdapter, "/qwen/"),
    "sandbox": lambda: SandboxAdapter(),
}


@pytest.fixture(params=sorted(ADAPTERS))
async def adapter(request: pytest.FixtureRequest) -> AsyncIterator[ProviderAdapter]:
    built = ADAPTERS[request.param]()
    yield built
    await built.aclose()


def test_every_provider_in_the_catalog_is_covered() -> None:
    assert set(ADAPTERS) == set(PROVIDERS)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("a fox", {"num_images": 9}, "num_images"),  # more than any provider makes
        ("a fox", {"image_size": "banana"}, "image_size"),
        ("a fox", {"seed": "seven"}, "seed"),
        ("   ", {}, "prompt"),
        ("a \x00 fox", {}, "prompt"),
    ],
)
async def test_translate_refuses_with_invalid_input_naming_the_field(
    adapter: ProviderAdapter, prompt: str, params: dict[str, Any], field: str
) -> None:
    request = AdapterRequest(prompt, params)
    with pytest.raises(InvalidInput) as refused:
        adapter.translate(request)
    assert not isinstance(refused.value, ProviderError)
    assert list(refused.value.field_errors) == [field]
    assert refused.value.field_errors[field]

    # generate() reports the same refusal as a VALIDATION error, not billed, without connecting anywhere.
    with pytest.raises(ProviderError) as failed:
        await adapter.generate(request)
    assert failed.value.error_class is ErrorClass.VALIDATION, failed.value
    assert failed.value.billing is Billing.NOT_BILLED
    assert failed.value.provider == adapter.provider_id


async def test_translate_takes_its_ranges_from_the_catalog(
    adapter: ProviderAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One validator, the catalog's ranges: an adapter has no range of its own to drift from the catalog's.
    spec = PROVIDERS[adapter.provider_id]
    assert adapter.translate(AdapterRequest("a fox", {"num_images": 1})).wire_params is not None
    monkeypatch.setitem(spec.params, "seed", replace(spec.params["seed"], maximum=10))
    with pytest.raises(InvalidInput) as refused:
        adapter.translate(AdapterRequest("a fox", {"seed": 11}))
    assert "maximum of 10" in refused.value.field_errors["seed"]


def test_the_common_parameters_are_listed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # GlobalSettings sets exactly the catalog's common parameters: the list is not typed a second time.
    values: dict[str, Any] = {
        "negative_prompt": "blur",
        "num_inference_steps": 20,
        "guidance_scale": 3.0,
        "image_size": "square_hd",
        "num_images": 2,
        "seed": 1,
        "enable_safety_checker": True,
        "sync_mode": False,
    }
    assert set(values) == set(COMMON_PARAMS)
    settings = GlobalSettings(**values)
    assert list(settings.generation_params()) == list(COMMON_PARAMS)
    # ... read from the catalog's list itself, not from a copy of it.
    monkeypatch.setattr("core.settings.COMMON_PARAMS", ("seed", "num_images"))
    assert settings.generation_params() == {"seed": 1, "num_images": 2}
