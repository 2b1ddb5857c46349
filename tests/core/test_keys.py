"""Provider keys: where they come from, how they are masked, and that they never leak through repr()."""

from __future__ import annotations

import pytest

from core import keys
from core.providers.base import AdapterConfig, ConnectionMode
from core.providers.registry import (
    EMULATOR_API_KEY,
    EMULATOR_URL_ENV,
    build_adapter,
    connection_for,
    default_spend_view,
)

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


# --- where a key may be sent -------------------------------------------------------------------------------------

HF_SECRET = "hf_0123456789abcdef-SECRET"


@pytest.fixture
def no_allowed_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(keys.HF_ALLOWED_ENDPOINTS_ENV, raising=False)


def test_the_emulator_variable_is_the_registry_s() -> None:
    assert keys.EMULATOR_URL_ENV == EMULATOR_URL_ENV


@pytest.mark.parametrize(
    "url",
    [
        "https://huggingface.co/api/models/x",
        "https://router.huggingface.co/hf-inference/models/x",
        "https://api-inference.huggingface.co/models/x",
        "https://ROUTER.HuggingFace.co/x",  # host names are case-insensitive
        "https://x1.eu-west-1.aws.endpoints.huggingface.cloud/",
        "https://huggingface.co:443/x",
    ],
)
def test_hugging_face_s_own_hosts_may_receive_its_token(no_allowed_endpoints: None, url: str) -> None:
    assert keys.key_destination_problem("huggingface", url) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://evil.example/", "not one of Hugging Face's hosts"),
        ("https://evilhuggingface.co/", "not one of Hugging Face's hosts"),  # not a subdomain
        ("https://huggingface.co.evil.example/", "not one of Hugging Face's hosts"),
        ("https://huggingface.co@evil.example/", "user name or password"),
        ("https://evil.example#@huggingface.co/", "not one of Hugging Face's hosts"),
        ("https://evil.example\\@huggingface.co/", "backslashes"),
        ("https://evil.example/ huggingface.co", "spaces"),
        ("https://endpoints.huggingface.cloud.evil.example/", "not one of Hugging Face's hosts"),
        ("https://x.huggingface.cloud/", "not one of Hugging Face's hosts"),  # only *.endpoints.huggingface.cloud
        ("http://huggingface.co/", "plain http"),
        ("http://192.168.1.10/", "plain http"),
        ("http://127.0.0.1:8000/", "not one of Hugging Face's hosts"),
        ("ftp://huggingface.co/", "only http(s)"),
        ("https://huggingface.co:99999/", "not a valid URL"),
        ("https:///path-only", "no host name"),
    ],
)
def test_anything_else_may_not(no_allowed_endpoints: None, url: str, reason: str) -> None:
    problem = keys.key_destination_problem("huggingface", url)
    assert problem is not None and reason in problem
    assert "HF_TOKEN" in problem


def test_allowed_prefixes_match_whole_origins_and_path_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(keys.HF_ALLOWED_ENDPOINTS_ENV, " https://ep.example/v1/ ,http://localhost:9000,, ")
    allowed = ["https://ep.example/v1", "https://ep.example/v1/models/a", "http://localhost:9000/anything"]
    refused = [
        "https://ep.example/v10",
        "https://ep.example/v1/../admin",
        "https://ep.example/v1/%2e%2e/admin",
        "https://ep.example:8443/v1",
        "http://ep.example/v1",
        "https://ep.example.evil/v1",
        "http://localhost:9001/",
    ]
    assert [u for u in allowed if keys.key_destination_problem("huggingface", u) is not None] == []
    assert [u for u in refused if keys.key_destination_problem("huggingface", u) is None] == []


def test_an_adapter_s_base_url_and_emulator_mode_widen_only_what_they_say(no_allowed_endpoints: None) -> None:
    assert keys.key_destination_problem("huggingface", "http://127.0.0.1:1/x", allow_loopback=True) is None
    assert keys.key_destination_problem("huggingface", "http://10.1.1.1/x", allow_loopback=True) is not None
    base = "http://127.0.0.1:5/hf"
    assert keys.key_destination_problem("huggingface", base + "/models/a", also_allowed=[base]) is None
    assert keys.key_destination_problem("huggingface", "http://127.0.0.1:6/hf", also_allowed=[base]) is not None


def test_fal_and_ideogram_live_adapters_send_their_keys_only_to_their_own_hosts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core.providers import fal, ideogram

    monkeypatch.setenv(EMULATOR_URL_ENV, "http://127.0.0.1:8787")  # set, but a key makes them live anyway
    monkeypatch.setenv("FAL_KEY", SECRET)
    monkeypatch.setenv("IDEOGRAM_API_KEY", "ideogram-secret-value")
    live_fal = build_adapter("fal-qwen")
    live_ideogram = build_adapter("ideogram")
    assert live_fal.config.base_url is None and live_ideogram.config.base_url is None
    assert keys.key_destination_problem("fal-qwen", fal.LIVE_QUEUE_URL) is None
    assert isinstance(live_ideogram, ideogram.IdeogramAdapter)
    assert keys.key_destination_problem("ideogram", live_ideogram.base_url) is None
    # Without a key they run against the emulator with the emulator's own key, never a configured one.
    monkeypatch.delenv("FAL_KEY")
    emulated = build_adapter("fal-qwen")
    assert emulated.config.mode is ConnectionMode.EMULATOR and emulated.config.api_key == EMULATOR_API_KEY


class _Listener:
    """A loopback HTTP server that records every request it gets: a stand-in for a token collector."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.requests: list[dict[str, str]] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> None:
                listener.requests.append(dict(self.headers))
                self.send_response(200)
                self.end_headers()

            do_GET = do_POST = _record

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/collect"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_the_hf_adapter_never_sends_its_token_to_a_url_it_may_not(no_allowed_endpoints: None) -> None:
    from common.errors import ImagegateError
    from core.providers.base import AdapterRequest
    from core.providers.huggingface import HuggingFaceAdapter

    listener = _Listener()
    try:
        live = HuggingFaceAdapter(AdapterConfig(api_key=HF_SECRET, mode=ConnectionMode.LIVE))
        request = AdapterRequest("a fox", {"model": listener.url, "image_size": "256x256", "seed": 1}, 10.0)
        with pytest.raises(ImagegateError) as caught:
            await live.generate(request)
        assert "IMAGEGATE_HF_ALLOWED_ENDPOINTS" in str(caught.value) + str(getattr(caught.value, "field_errors", ""))
        probe = await HuggingFaceAdapter(
            AdapterConfig(api_key=HF_SECRET, mode=ConnectionMode.LIVE, extra={"model": listener.url})
        ).health_probe()
        assert not probe.ok
        assert listener.requests == []  # nothing was sent, so no token either
    finally:
        listener.close()


async def test_the_hf_adapter_calls_an_endpoint_the_operator_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.providers.huggingface import HuggingFaceAdapter

    listener = _Listener()
    monkeypatch.setenv(keys.HF_ALLOWED_ENDPOINTS_ENV, listener.url)
    try:
        live = HuggingFaceAdapter(
            AdapterConfig(api_key=HF_SECRET, mode=ConnectionMode.LIVE, extra={"model": listener.url})
        )
        assert (await live.health_probe()).ok
        assert listener.requests and listener.requests[0]["Authorization"] == f"Bearer {HF_SECRET}"
    finally:
        listener.close()


def test_keys_in_finds_a_configured_key_anywhere_and_names_only_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAL_KEY_ID", "fal-id-0000")
    monkeypatch.setenv("FAL_KEY_SECRET", "fal-secret-part-1234")
    data = {"a": ["fine", {"b": "x fal-secret-part-1234 y"}], "fal-id-0000:fal-secret-part-1234": 1}
    errors = keys.keys_in(data)
    # A key used as a mapping key is found too, and its path (which is printed) does not repeat it.
    assert set(errors) == {"a[1].b", "<FAL_KEY_ID+FAL_KEY_SECRET value>"}
    assert all("FAL_KEY" in m and "fal-secret-part-1234" not in m for m in errors.values())
    assert keys.redact("a fal-secret-part-1234 b") == "a <FAL_KEY_SECRET value> b"
    assert keys.keys_in({"a": "nothing secret"}) == {}


def test_pages_show_simulated_spend_first_until_a_provider_is_live(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_spend_view() == "simulated"  # the sandbox everywhere: no live money to show
    monkeypatch.setenv(EMULATOR_URL_ENV, "http://127.0.0.1:8787/")
    assert default_spend_view() == "simulated"  # the emulator's runs are simulated too
    monkeypatch.setenv("FAL_KEY", SECRET)
    assert default_spend_view() == "live"  # one live provider is enough
