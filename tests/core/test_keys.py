"""Provider keys: where they come from, how they are masked, and that they never leak through repr()."""

from __future__ import annotations

import pytest

from core import keys
from core.providers.base import AdapterConfig, ConnectionMode
from core.providers.registry import EMULATOR_URL_ENV, build_adapter, connection_for

SECRET = "fal-0123456789abcdef-SECRET"


@pytest.fixture(autouse=True)
def clean_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "IDEOGRAM_API_KEY", "HF_TOKEN", EMULATOR_URL_ENV):
        monkeypatch.delenv(name, raising=False)
    keys.clear_secret_sources()


def test_masking_never_shows_enough_to_use_a_key() -> None:
    assert keys.mask_secret(None) == "not set"
    assert keys.mask_secret("short") == "•••• (5 chars)"
    masked = keys.mask_secret(SECRET)
    assert masked == "fal-…CRET (27 chars)"
    assert SECRET not in masked


def test_key_from_environment_or_secrets_and_the_two_part_fal_form(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not keys.key_status("fal-qwen").configured
    keys.register_secret_source({"IDEOGRAM_API_KEY": "ideogram-secret-value"})
    assert keys.provider_key("ideogram") == "ideogram-secret-value"
    monkeypatch.setenv("FAL_KEY_ID", "id-123")
    assert keys.provider_key("fal-qwen") is None  # half a credential is none
    monkeypatch.setenv("FAL_KEY_SECRET", "s3cr3t-part")
    assert keys.provider_key("fal-qwen") == "id-123:s3cr3t-part"
    status = keys.key_status("fal-qwen")
    assert status.configured and status.env_vars == ("FAL_KEY_ID", "FAL_KEY_SECRET")
    assert "s3cr3t-part" not in repr(status)


def test_connection_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert connection_for("fal-qwen").mode is ConnectionMode.SANDBOX
    assert build_adapter("fal-qwen").mode is ConnectionMode.SANDBOX
    monkeypatch.setenv(EMULATOR_URL_ENV, "http://127.0.0.1:8787/")
    emulated = connection_for("qwen")
    assert emulated.mode is ConnectionMode.EMULATOR and emulated.base_url == "http://127.0.0.1:8787/qwen/"
    monkeypatch.setenv("FAL_KEY", SECRET)
    live = connection_for("fal-qwen")
    assert live.mode is ConnectionMode.LIVE and live.base_url is None
    adapter = build_adapter("fal-qwen")
    assert adapter.config.api_key == SECRET
    assert SECRET not in repr(adapter.config)
    assert connection_for("sandbox").mode is ConnectionMode.SANDBOX


def test_adapter_config_repr_hides_the_key() -> None:
    config = AdapterConfig(api_key=SECRET, base_url="http://127.0.0.1:1")
    assert SECRET not in repr(config) and "127.0.0.1:1" in repr(config)
