"""Settings models, parameter validation, presets and the effective-parameter resolver."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from common.errors import InvalidInput
from core.catalog import PROVIDERS, ParamSpec
from core.presets import PRESET_NAMES, PRESETS, UnknownPreset, preset_params, presets_for
from core.settings import (
    DEFAULT_REQUEST_TIMEOUT_S,
    EffectiveParams,
    GlobalSettings,
    ProviderSettings,
    TaggedValue,
    default_provider_settings,
    describe_source,
    resolve_effective,
    validate_global_settings,
    validate_params,
    validate_provider_settings,
)

NUMERIC = [
    (pid, p)
    for pid, spec in PROVIDERS.items()
    for p in spec.params.values()
    if p.kind in ("int", "float") and p.minimum is not None and p.maximum is not None
]
ENUMS = [(pid, p) for pid, spec in PROVIDERS.items() for p in spec.params.values() if p.kind == "enum"]
BOOLS = [(pid, p) for pid, spec in PROVIDERS.items() for p in spec.params.values() if p.kind == "bool"]


def _id(item: tuple[str, ParamSpec]) -> str:
    return f"{item[0]}.{item[1].name}"


def _shown(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def resolve(provider="fal-qwen", *, g=None, ps=None, preset=None, overrides=None, prompt="a red fox"):
    return resolve_effective(
        provider, global_settings=g, provider_settings=ps, preset=preset, overrides=overrides, prompt=prompt
    )


# ---------------------------------------------------------------------------------------------------------------
# validate_params: property-based
# ---------------------------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=150)
@given(st.sampled_from(NUMERIC), st.data())
def test_any_in_range_value_is_accepted(item, data):
    pid, p = item
    if p.kind == "int":
        value = data.draw(st.integers(int(p.minimum), int(p.maximum)))
    else:
        value = data.draw(st.floats(p.minimum, p.maximum, allow_nan=False))
    assert validate_params(pid, {p.name: value}) == {}


@settings(deadline=None, max_examples=150)
@given(st.sampled_from(NUMERIC), st.booleans(), st.data())
def test_any_out_of_range_value_is_refused_naming_field_value_and_limit(item, above, data):
    pid, p = item
    if p.kind == "int":
        value = data.draw(
            st.integers(int(p.maximum) + 1, 10**12) if above else st.integers(-(10**12), int(p.minimum) - 1)
        )
    else:
        value = data.draw(
            st.floats(p.maximum, 1e12, exclude_min=True) if above else st.floats(-1e12, p.minimum, exclude_max=True)
        )
    errors = validate_params(pid, {p.name: value})
    assert list(errors) == [p.name]
    msg = errors[p.name]
    limit = p.maximum if above else p.minimum
    assert msg.startswith(f"{p.name} {_shown(value)} is {'above' if above else 'below'} {pid}'s")
    assert msg.endswith(f"{'maximum' if above else 'minimum'} of {_shown(limit)}")


@settings(deadline=None)
@given(st.sampled_from(list(PROVIDERS)), st.text(min_size=1, max_size=30))
def test_unknown_keys_are_refused_listing_the_providers_params(pid, name):
    spec = PROVIDERS[pid]
    assume(name not in spec.params)
    errors = validate_params(pid, {name: 1})
    assert list(errors) == [name]
    assert f"unknown parameter {name!r} for {pid}" in errors[name]
    assert all(param in errors[name] for param in spec.params)


@settings(deadline=None)
@given(st.sampled_from(ENUMS), st.data())
def test_enum_choices_are_accepted_in_any_case_and_others_list_the_choices(item, data):
    pid, p = item
    choice = data.draw(st.sampled_from(p.choices))
    assert validate_params(pid, {p.name: choice.swapcase()}) == {}
    other = data.draw(st.text(max_size=12))
    assume(other.strip().lower() not in {c.lower() for c in p.choices})
    msg = validate_params(pid, {p.name: other})[p.name]
    assert msg == f"{p.name} {other!r} is not one of {', '.join(p.choices)}"


@pytest.mark.parametrize("item", BOOLS, ids=_id)
@pytest.mark.parametrize("value", [1, 0, "true", None])
def test_booleans_must_be_booleans(item, value):
    pid, p = item
    assert p.name in validate_params(pid, {p.name: value})


@pytest.mark.parametrize("value", [True, "30", 30.5, math.nan, [30]])
def test_steps_need_a_whole_number(value):
    assert (
        "must be a whole number" in validate_params("fal-qwen", {"num_inference_steps": value})["num_inference_steps"]
    )


def test_integral_floats_become_ints_and_ints_become_floats():
    ps = validate_provider_settings("fal-qwen", {"params": {"num_inference_steps": 30.0, "guidance_scale": 4}})
    assert ps.params == {"num_inference_steps": 30, "guidance_scale": 4.0}
    assert type(ps.params["num_inference_steps"]) is int and type(ps.params["guidance_scale"]) is float


def test_infinite_guidance_is_refused():
    assert "finite" in validate_params("fal-qwen", {"guidance_scale": math.inf})["guidance_scale"]


def test_seed_may_be_none_but_other_params_need_a_value():
    assert validate_params("fal-qwen", {"seed": None}) == {}
    assert "needs a value" in validate_params("fal-qwen", {"num_images": None})["num_images"]


@pytest.mark.parametrize(
    ("pid", "size", "ok"),
    [
        ("fal-qwen", "square_hd", True),
        ("fal-qwen", "1344x768", True),
        ("fal-qwen", "20000x512", False),
        ("sandbox", "4000x4000", False),
        ("ideogram", "16:9", True),
        ("ideogram", "1000x1000", True),  # not an Ideogram resolution, but it renders the nearest one
        ("qwen", "1:1", True),
        ("huggingface", "100x100", False),
        ("fal-qwen", "big", False),
        ("fal-qwen", 1024, False),
    ],
)
def test_sizes_are_checked_with_core_sizes(pid, size, ok):
    errors = validate_params(pid, {"image_size": size})
    assert (errors == {}) is ok, errors
    if not ok:
        assert errors["image_size"].startswith("image_size")


def test_negative_prompt_is_checked_like_a_prompt():
    assert "control character" in validate_params("fal-qwen", {"negative_prompt": "blur\x00"})["negative_prompt"]
    assert validate_params("fal-qwen", {"negative_prompt": ""}) == {}


def test_unknown_provider():
    assert "unknown provider 'dall-e'" in validate_params("dall-e", {})["provider"]


# ---------------------------------------------------------------------------------------------------------------
# ProviderSettings / validate_provider_settings
# ---------------------------------------------------------------------------------------------------------------


def test_design_document_example_message():
    with pytest.raises(InvalidInput) as info:
        validate_provider_settings("fal-qwen", {"params": {"guidance_scale": 25}})
    assert info.value.field_errors == {"params.guidance_scale": "guidance_scale 25 is above fal-qwen's maximum of 20"}


def test_all_field_errors_are_collected():
    with pytest.raises(InvalidInput) as info:
        validate_provider_settings(
            "fal-qwen",
            {
                "params": {"guidance_scale": 25, "foo": 1, "acceleration": "max", "num_images": 9},
                "priority": 2000,
                "active": "yes",
                "daily_cost_limit_usd": "-1",
                "colour": "red",
            },
        )
    errors = info.value.field_errors
    assert set(errors) == {
        "params.guidance_scale",
        "params.foo",
        "params.acceleration",
        "params.num_images",
        "priority",
        "active",
        "daily_cost_limit_usd",
        "colour",
    }
    assert errors["priority"] == "priority 2000 is above the maximum of 1000"
    assert errors["active"] == "active must be true or false, not 'yes'"
    assert "none, regular, high" in errors["params.acceleration"]
    assert "unknown setting 'colour'" in errors["colour"]
    assert "8 problem(s)" in str(info.value)


def test_qwen_has_no_sync_mode():
    with pytest.raises(InvalidInput) as info:
        validate_provider_settings("qwen", {"params": {"sync_mode": True}})
    assert "unknown parameter 'sync_mode' for qwen" in info.value.field_errors["params.sync_mode"]


def test_settings_for_another_provider_are_refused():
    with pytest.raises(InvalidInput) as info:
        validate_provider_settings("fal-qwen", {"provider": "ideogram"})
    assert "provider" in info.value.field_errors


def test_unknown_provider_settings():
    with pytest.raises(InvalidInput) as info:
        validate_provider_settings("midjourney", {})
    assert "known providers" in info.value.field_errors["provider"]


@pytest.mark.parametrize("pid", list(PROVIDERS))
def test_defaults_come_from_the_catalog(pid):
    spec = PROVIDERS[pid]
    ps = default_provider_settings(pid)
    assert ps.params == {}
    assert ps.priority == spec.default_priority
    assert ps.auto_routing is (not spec.premium)
    assert ps.active and not ps.is_default
    assert ProviderSettings.defaults(pid) == ps


def test_premium_provider_is_not_routed_automatically_unless_allowed():
    assert default_provider_settings("ideogram").auto_routing is False
    assert validate_provider_settings("ideogram", {"auto_routing": True}).auto_routing is True


def test_daily_cost_limit_is_whole_micro_dollars():
    ps = validate_provider_settings("fal-qwen", {"daily_cost_limit_usd": "5.000001"})
    assert ps.daily_cost_limit_micros == 5_000_001
    with pytest.raises(InvalidInput) as info:
        validate_provider_settings("fal-qwen", {"daily_cost_limit_usd": "0.0000001"})
    assert "more than 6 decimal places" in info.value.field_errors["daily_cost_limit_usd"]


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ("1E+1000", "uses an exponent"),
        ("1E+100000000", "uses an exponent"),
        ("10000000.01", "above the maximum of 10,000,000"),
        (0.1, "not exactly 0.1"),
        (True, "not True"),
        ("-5", "is negative"),
    ],
)
def test_daily_cost_limit_is_bounded(limit, message):
    with pytest.raises(InvalidInput) as info:
        validate_provider_settings("fal-qwen", {"daily_cost_limit_usd": limit})
    assert message in info.value.field_errors["daily_cost_limit_usd"]
    assert validate_provider_settings("fal-qwen", {"daily_cost_limit_usd": "10000000"}).daily_cost_limit_micros == (
        10_000_000 * 1_000_000
    )


@pytest.mark.parametrize("timeout", [True, False, "30", "1e2", None])
def test_request_timeout_is_as_strict_as_every_parameter(timeout):
    with pytest.raises(InvalidInput) as info:
        validate_global_settings({"request_timeout_s": timeout})
    assert "request_timeout_s" in info.value.field_errors
    if timeout is not None:
        with pytest.raises(InvalidInput) as info:
            validate_provider_settings("fal-qwen", {"request_timeout_s": timeout})
        assert "request_timeout_s must be a number" in info.value.field_errors["request_timeout_s"]


def test_request_timeout_takes_whole_and_fractional_numbers():
    assert validate_global_settings({"request_timeout_s": 30}).request_timeout_s == 30.0
    assert validate_provider_settings("fal-qwen", {"request_timeout_s": 12.5}).request_timeout_s == 12.5


@pytest.mark.parametrize("timeout", [0, -1, 600.5])
def test_request_timeout_bounds(timeout):
    with pytest.raises(InvalidInput) as info:
        validate_provider_settings("fal-qwen", {"request_timeout_s": timeout})
    assert "request_timeout_s" in info.value.field_errors


def test_provider_settings_json_round_trip_and_immutability():
    ps = validate_provider_settings(
        "ideogram",
        {"params": {"rendering_speed": "quality", "num_images": 2}, "daily_cost_limit_usd": Decimal("2.50")},
    )
    assert ps.params["rendering_speed"] == "QUALITY"
    dumped = ps.model_dump_json()
    assert '"daily_cost_limit_usd":"2.5"' in dumped  # canonical: 2.50 and 2.5 are one limit
    assert ProviderSettings.model_validate_json(dumped) == ps
    with pytest.raises(ValidationError):
        ps.priority = 1  # type: ignore[misc]


def test_constructing_provider_settings_directly_also_validates_params():
    with pytest.raises(ValidationError) as info:
        ProviderSettings(provider="qwen", params={"guidance_scale": 12.0})
    assert "guidance_scale 12 is above qwen's maximum of 10" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# GlobalSettings
# ---------------------------------------------------------------------------------------------------------------


def test_global_settings_defaults_set_nothing():
    g = GlobalSettings()
    assert g.generation_params() == {}
    assert g.request_timeout_s == DEFAULT_REQUEST_TIMEOUT_S


def test_global_settings_errors_are_collected():
    with pytest.raises(InvalidInput) as info:
        validate_global_settings(
            {
                "request_timeout_s": 601,
                "image_size": "huge",
                "default_provider": "fal-qwen",
                "default_preset": "turbo",
                "num_inference_steps": 0,
                "seed": True,
                "extra": 1,
            }
        )
    errors = info.value.field_errors
    # The default provider is a provider setting (is_default, one at most), never a global one.
    assert set(errors) == {
        "request_timeout_s",
        "image_size",
        "default_provider",
        "default_preset",
        "num_inference_steps",
        "seed",
        "extra",
    }
    assert errors["request_timeout_s"] == "request_timeout_s 601 is above the maximum of 600"
    assert "Fast, Standard, High, Ultra" in errors["default_preset"]


def test_global_preset_name_is_canonicalised():
    assert validate_global_settings({"default_preset": " High "}).default_preset == "high"


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("pid", list(PROVIDERS))
def test_every_preset_is_valid_for_every_provider(preset, pid):
    values = preset_params(preset, pid)
    assert values, f"{preset} sets nothing for {pid}"
    assert validate_params(pid, values) == {}
    assert "image_size" not in values and "num_images" not in values


def test_presets_rise_in_steps_and_ideogram_speed():
    for pid in ("fal-qwen", "huggingface", "qwen", "sandbox"):
        steps = [PRESETS[name][pid]["num_inference_steps"] for name in PRESET_NAMES]
        assert steps == sorted(steps) and steps[0] < steps[-1]
    assert [PRESETS[n]["ideogram"]["rendering_speed"] for n in PRESET_NAMES] == [
        "TURBO",
        "DEFAULT",
        "QUALITY",
        "QUALITY",
    ]


def test_preset_lookup():
    assert preset_params("FAST", "ideogram") == {"rendering_speed": "TURBO"}
    with pytest.raises(UnknownPreset, match="Fast, Standard, High, Ultra"):
        preset_params("turbo", "ideogram")
    preset_params("fast", "ideogram")["rendering_speed"] = "QUALITY"
    assert PRESETS["fast"]["ideogram"]["rendering_speed"] == "TURBO", "callers must get a copy"
    assert list(presets_for("qwen")) == list(PRESET_NAMES)


# ---------------------------------------------------------------------------------------------------------------
# resolve_effective
# ---------------------------------------------------------------------------------------------------------------


def test_catalog_defaults_only():
    eff = resolve()
    spec = PROVIDERS["fal-qwen"]
    assert eff.values() == {name: p.default for name, p in spec.params.items()}
    assert set(eff.sources().values()) == {"catalog"}
    assert eff.request_timeout_s == DEFAULT_REQUEST_TIMEOUT_S
    assert eff.timeout.source == "catalog"


def test_each_layer_overrides_the_one_below_and_is_tagged():
    g = GlobalSettings(guidance_scale=5.0, num_inference_steps=20, seed=1, request_timeout_s=90)
    ps = validate_provider_settings("fal-qwen", {"params": {"guidance_scale": 6.0, "seed": 2}, "request_timeout_s": 45})
    eff = resolve(g=g, ps=ps, preset="high", overrides={"seed": 3})
    assert (eff.value_of("seed"), eff.source_of("seed")) == (3, "request")
    assert (eff.value_of("guidance_scale"), eff.source_of("guidance_scale")) == (4.0, "preset:high")
    assert (eff.value_of("num_inference_steps"), eff.source_of("num_inference_steps")) == (40, "preset:high")
    assert (eff.value_of("acceleration"), eff.source_of("acceleration")) == ("none", "preset:high")
    assert (eff.value_of("num_images"), eff.source_of("num_images")) == (1, "catalog")
    assert eff.request_timeout_s == 45 and eff.timeout.source == "provider"
    assert eff.preset == "high"

    eff = resolve(g=g, ps=ps)
    assert (eff.value_of("guidance_scale"), eff.source_of("guidance_scale")) == (6.0, "provider")
    assert (eff.value_of("num_inference_steps"), eff.source_of("num_inference_steps")) == (20, "global")
    assert (eff.value_of("seed"), eff.source_of("seed")) == (2, "provider")

    eff = resolve(g=g)
    assert (eff.value_of("guidance_scale"), eff.source_of("guidance_scale")) == (5.0, "global")
    assert eff.request_timeout_s == 90 and eff.timeout.source == "global"


_LAYERS = ("global", "provider", "preset", "request")


@settings(deadline=None, max_examples=60)
@given(st.sets(st.sampled_from(_LAYERS)))
def test_the_highest_layer_that_sets_a_value_wins(layers):
    g = GlobalSettings(num_inference_steps=11) if "global" in layers else None
    ps = ProviderSettings(provider="sandbox", params={"num_inference_steps": 22}) if "provider" in layers else None
    preset = "ultra" if "preset" in layers else None
    overrides = {"num_inference_steps": 33} if "request" in layers else None
    eff = resolve("sandbox", g=g, ps=ps, preset=preset, overrides=overrides)
    expected = {"global": 11, "provider": 22, "preset": 50, "request": 33}
    top = max(layers, key=_LAYERS.index) if layers else None
    assert eff.value_of("num_inference_steps") == (expected[top] if top else 25)
    assert eff.source_of("num_inference_steps") == {None: "catalog", "preset": "preset:ultra"}.get(top, top)


def test_global_settings_only_apply_to_params_the_provider_has():
    g = GlobalSettings(sync_mode=True, enable_safety_checker=False, negative_prompt="blurry")
    eff = resolve("qwen", g=g)
    assert "sync_mode" not in eff.values() and "negative_prompt" not in eff.values()
    eff = resolve("fal-qwen", g=g)
    assert eff.source_of("sync_mode") == "global" and eff.value_of("sync_mode") is True
    assert eff.value_of("negative_prompt") == "blurry"


def test_global_value_beyond_a_providers_range_is_clamped_with_a_note():
    g = GlobalSettings(guidance_scale=15.0, num_images=4)
    eff = resolve("qwen", g=g)
    assert eff.value_of("guidance_scale") == 10.0 and eff.source_of("guidance_scale") == "global"
    assert eff.value_of("num_images") == 1
    assert any("guidance_scale 15 from the global settings is above qwen's maximum of 10" in n for n in eff.notes)
    # When a later layer replaces the value, the clamp note would only confuse.
    eff = resolve("qwen", g=g, preset="fast")
    assert not any("guidance_scale" in n for n in eff.notes)


def test_global_size_a_provider_cannot_render_falls_back_to_its_default():
    eff = resolve("sandbox", g=GlobalSettings(image_size="4000x4000"))
    assert eff.value_of("image_size") == PROVIDERS["sandbox"].params["image_size"].default
    assert eff.source_of("image_size") == "catalog"
    assert any("4000x4000" in n for n in eff.notes)
    assert resolve("fal-qwen", g=GlobalSettings(image_size="4000x4000")).value_of("image_size") == "4000x4000"


def test_inexact_size_is_noted():
    eff = resolve("qwen", overrides={"image_size": "1024x768"})
    assert eff.value_of("image_size") == "1024x768"
    assert any("4:3" in n for n in eff.notes)


def test_request_errors_are_all_collected_with_the_prompt():
    with pytest.raises(InvalidInput) as info:
        resolve(
            "fal-qwen",
            preset="extreme",
            overrides={"guidance_scale": 25, "rendering_speed": "TURBO", "num_images": 0},
            prompt="cat\x1b[31m",
        )
    errors = info.value.field_errors
    assert set(errors) == {"preset", "guidance_scale", "rendering_speed", "num_images", "prompt"}
    assert errors["guidance_scale"] == "guidance_scale 25 is above fal-qwen's maximum of 20"
    assert "U+001B (ESC) at position 4" in errors["prompt"]


@pytest.mark.parametrize("prompt", ["", "   ", "x" * 4001])
def test_bad_prompts_are_refused_by_the_resolver(prompt):
    with pytest.raises(InvalidInput) as info:
        resolve(prompt=prompt)
    assert list(info.value.field_errors) == ["prompt"]


def test_prompt_is_stripped():
    assert resolve(prompt="  a fox \n").prompt == "a fox"


def test_stale_provider_settings_are_reported_with_their_source():
    # A version stored before the catalog narrowed a range: model_construct skips validation like old data would.
    stale = ProviderSettings.model_construct(
        provider="qwen",
        params={"guidance_scale": 15.0},
        priority=95,
        active=True,
        is_default=False,
        auto_routing=True,
        request_timeout_s=None,
        daily_cost_limit_usd=None,
    )
    with pytest.raises(InvalidInput) as info:
        resolve("qwen", ps=stale)
    assert info.value.field_errors["guidance_scale"] == (
        "guidance_scale 15 is above qwen's maximum of 10 (set by the provider settings)"
    )


def test_settings_of_another_provider_are_refused():
    with pytest.raises(InvalidInput):
        resolve("fal-qwen", ps=default_provider_settings("sandbox"))


def test_unknown_provider_is_refused():
    with pytest.raises(InvalidInput) as info:
        resolve("openai")
    assert "provider" in info.value.field_errors


def test_effective_params_are_immutable_and_serialisable():
    eff = resolve(preset="fast", overrides={"seed": 7})
    with pytest.raises(ValidationError):
        eff.prompt = "x"
    again = EffectiveParams.model_validate(eff.model_dump(mode="json"))
    assert again.values() == eff.values() and again.sources() == eff.sources()
    assert eff.params["seed"] == TaggedValue(7, "request")
    with pytest.raises(KeyError, match="its parameters are"):
        eff.source_of("rendering_speed")


def test_global_default_preset_applies_unless_the_request_says_otherwise():
    g = GlobalSettings(default_preset="fast")
    eff = resolve("ideogram", g=g)
    assert (eff.value_of("rendering_speed"), eff.source_of("rendering_speed")) == ("TURBO", "preset:fast")
    assert eff.preset == "fast"
    assert resolve("ideogram", g=g, preset="ultra").value_of("rendering_speed") == "QUALITY"
    eff = resolve("ideogram", g=g, preset="none")
    assert eff.preset is None and eff.source_of("rendering_speed") == "catalog"


def test_source_descriptions():
    assert describe_source("preset:ultra") == "the Ultra preset"
    assert describe_source("request") == "the request"


# ---------------------------------------------------------------------------------------------------------------
# Where a key may go (HF `model` URLs) and keys in settings
# ---------------------------------------------------------------------------------------------------------------

HF_TOKEN = "hf_0123456789abcdefSECRET"


@pytest.fixture
def no_allowed_endpoints(monkeypatch):
    for name in ("IMAGEGATE_HF_ALLOWED_ENDPOINTS", "IMAGEGATE_EMULATOR_URL", "HF_TOKEN", "FAL_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://collector.example.net/", "is not one of Hugging Face's hosts"),
        ("http://collector.example.net/", "plain http"),
        ("http://router.huggingface.co/models/x", "plain http"),
        ("https://huggingface.co.collector.net/", "is not one of Hugging Face's hosts"),
        ("https://huggingface.co@collector.net/", "user name or password"),
        ("http://127.0.0.1:9999/steal", "is not one of Hugging Face's hosts"),  # a local listener too
        ("HTTPS://collector.example.net/", "is not one of Hugging Face's hosts"),
    ],
)
def test_a_model_url_that_would_receive_the_token_elsewhere_is_refused(no_allowed_endpoints, url, message):
    with pytest.raises(InvalidInput) as info:
        validate_provider_settings("huggingface", {"params": {"model": url}})
    error = info.value.field_errors["params.model"]
    assert error.startswith("model: ") and message in error
    if "plain http" not in message and "user name" not in message:
        assert "IMAGEGATE_HF_ALLOWED_ENDPOINTS" in error  # says how to allow it


@pytest.mark.parametrize(
    "url",
    [
        "https://router.huggingface.co/hf-inference/models/Qwen/Qwen-Image",
        "https://api-inference.huggingface.co/models/Qwen/Qwen-Image",
        "https://abc123.us-east-1.aws.endpoints.huggingface.cloud",
        "Qwen/Qwen-Image",  # a model id: huggingface_hub routes it to HF
    ],
)
def test_hugging_face_hosts_and_model_ids_are_accepted(no_allowed_endpoints, url):
    assert validate_provider_settings("huggingface", {"params": {"model": url}}).params["model"] == url


def test_the_operator_allows_endpoints_in_the_environment(no_allowed_endpoints, monkeypatch):
    url = "https://inference.internal.example/v1/models/qwen"
    with pytest.raises(InvalidInput):
        validate_provider_settings("huggingface", {"params": {"model": url}})
    monkeypatch.setenv("IMAGEGATE_HF_ALLOWED_ENDPOINTS", "https://inference.internal.example/v1, http://127.0.0.1:9000")
    assert validate_provider_settings("huggingface", {"params": {"model": url}}).params["model"] == url
    assert validate_provider_settings("huggingface", {"params": {"model": "http://127.0.0.1:9000/x"}})
    for outside in ("https://inference.internal.example/v10", "https://inference.internal.example:8443/v1"):
        with pytest.raises(InvalidInput):
            validate_provider_settings("huggingface", {"params": {"model": outside}})
    # The emulator the operator configured is allowed as well.
    monkeypatch.setenv("IMAGEGATE_EMULATOR_URL", "http://127.0.0.1:8787")
    assert validate_provider_settings("huggingface", {"params": {"model": "http://127.0.0.1:8787/hf/"}})


def test_plain_http_elsewhere_is_refused_even_when_listed(no_allowed_endpoints, monkeypatch):
    monkeypatch.setenv("IMAGEGATE_HF_ALLOWED_ENDPOINTS", "http://10.0.0.5/")
    with pytest.raises(InvalidInput) as info:
        validate_provider_settings("huggingface", {"params": {"model": "http://10.0.0.5/x"}})
    assert "plain http" in info.value.field_errors["params.model"]


def test_a_stored_or_requested_model_url_is_refused_at_resolution(no_allowed_endpoints):
    stored = ProviderSettings(provider="huggingface", params={"model": "https://collector.example.net/"})
    with pytest.raises(InvalidInput) as info:
        resolve_effective(
            "huggingface", global_settings=None, provider_settings=stored, preset=None, overrides=None, prompt="a fox"
        )
    assert "is not one of Hugging Face's hosts" in info.value.field_errors["model"]
    assert "(set by the provider settings)" in info.value.field_errors["model"]
    with pytest.raises(InvalidInput) as info:
        resolve_effective(
            "huggingface",
            global_settings=None,
            provider_settings=None,
            preset=None,
            overrides={"model": "http://collector.example.net/"},
            prompt="a fox",
        )
    assert "plain http" in info.value.field_errors["model"]


def test_settings_never_take_a_configured_key(no_allowed_endpoints, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    with pytest.raises(InvalidInput) as info:
        validate_provider_settings("fal-qwen", {"params": {"negative_prompt": f"blurry {HF_TOKEN}"}})
    error = info.value.field_errors["params.negative_prompt"]
    assert "configured API key HF_TOKEN" in error and HF_TOKEN not in error
    with pytest.raises(InvalidInput) as info:
        validate_global_settings({"negative_prompt": HF_TOKEN})
    assert HF_TOKEN not in str(info.value.field_errors)
