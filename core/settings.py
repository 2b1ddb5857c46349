"""Settings models, parameter validation and the one resolver of effective parameters.

Layers, lowest first (each only sets what it names; anything it leaves out is inherited):

1. catalog   the provider's defaults (core.catalog)
2. global    `GlobalSettings`: values shared by every provider; applied only to parameters the provider has
3. provider  `ProviderSettings.params` for that provider
4. user      the requesting user's own preferences (`UserPreferenceValues`: size, preset, negative prompt),
             within what the admins allow (`GlobalSettings.user_preference_fields`); core.preferences stores them
5. preset    a quality preset (core.presets); a user's preferred preset applies when the request names none
6. request   the request's own overrides

`resolve_effective` is the only place that merges them; every value in its result carries the layer it came
from. Global values are a base for providers with different limits, so a global value outside one provider's
range is clamped to that provider's limit (and an unrenderable global size falls back to the provider's
default), with a note saying so; values from every other layer must be valid as given or the request is
refused with field errors. This module has no database code: the settings service stores these models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.errors import InvalidInput
from core.catalog import COMMON_PARAMS, PROVIDERS, SEED_MAX, ParamSpec, ProviderSpec
from core.keys import key_destination_problem, keys_in, looks_like_url
from core.money import MAX_UNIT_PRICE_USD, exact_decimal, money_limit, usd_to_micros
from core.presets import PRESET_FORBIDDEN_PARAMS, PRESET_NAMES, UnknownPreset, normalize_preset, preset_params
from core.prompts import prompt_problem
from core.sizes import SizeError, parse_size, resolve_size

DEFAULT_REQUEST_TIMEOUT_S = 120.0
"""Deadline for one provider attempt when no settings say otherwise (the adapters' own default)."""
MAX_REQUEST_TIMEOUT_S = 600.0
MAX_PRIORITY = 1000
MAX_ROUTING_ATTEMPTS = 10
MAX_IN_FLIGHT = 1000
"""The highest per-provider concurrency limit (core.generation.limits.MAX_LIMIT)."""
MAX_RETRY_BACKOFF_S = 60.0
RoutingPolicyName = Literal["priority", "cheapest", "fastest", "explicit"]
"""The routing policies (core.generation.routing.RoutingPolicy has the same values)."""
_STR_PARAM_MAX_CHARS = 2000
"""Free-text parameters other than the negative prompt (a model id or an endpoint URL)."""

NO_PRESET = frozenset({"", "none"})
"""Preset values that mean "no preset", also when the global settings name a default one."""

SOURCE_CATALOG = "catalog"
SOURCE_GLOBAL = "global"
SOURCE_PROVIDER = "provider"
SOURCE_REQUEST = "request"
SOURCE_USER = "user preference"
PRESET_SOURCE_PREFIX = "preset:"
PRESET_EDITED_SUFFIX = " (edited)"
"""Appended to a preset's source when the value is the admins' edit, not the built-in one: "preset:fast (edited)"."""
DEFAULT_TARGET_COST_PER_IMAGE_USD = Decimal("0.02")
"""The design document's target cost per image; `GlobalSettings.target_cost_per_image_usd` changes it."""
USER_PREFERENCE_FIELDS: tuple[str, ...] = ("image_size", "preset", "negative_prompt")
"""What a user may set as their own default (core.preferences); admins may allow fewer."""

_SOURCE_WORDS = {
    SOURCE_CATALOG: "the catalog default",
    SOURCE_GLOBAL: "the global settings",
    SOURCE_PROVIDER: "the provider settings",
    SOURCE_REQUEST: "the request",
    SOURCE_USER: "your preferences",
}


def _widest(name: str, bound: str) -> float:
    """The loosest limit any provider has for a parameter: the range a global value may take."""
    values: list[float] = [
        getattr(spec.params[name], bound)
        for spec in PROVIDERS.values()
        if name in spec.params and getattr(spec.params[name], bound) is not None
    ]
    return max(values) if bound == "maximum" else min(values)


_GLOBAL_MAX_STEPS = int(_widest("num_inference_steps", "maximum"))
_GLOBAL_MAX_GUIDANCE = float(_widest("guidance_scale", "maximum"))
_GLOBAL_MAX_IMAGES = int(_widest("num_images", "maximum"))


def _fmt(value: Any) -> str:
    """A number as a person writes it (20, 2.5); anything else as its repr."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    return repr(value)


def _unknown_provider(provider_id: object) -> str:
    return f"unknown provider {provider_id!r}; known providers: {', '.join(PROVIDERS)}"


# --------------------------------------------------------------------------------------------------------------
# Parameter validation
# --------------------------------------------------------------------------------------------------------------


def _check_range(spec: ProviderSpec, p: ParamSpec, value: float) -> str | None:
    if p.minimum is not None and value < p.minimum:
        return f"{p.name} {_fmt(value)} is below {spec.id}'s minimum of {_fmt(p.minimum)}"
    if p.maximum is not None and value > p.maximum:
        return f"{p.name} {_fmt(value)} is above {spec.id}'s maximum of {_fmt(p.maximum)}"
    return None


def _type_name(value: object) -> str:
    return type(value).__name__


def check_param(spec: ProviderSpec, p: ParamSpec, value: Any) -> tuple[Any, str | None]:
    """Validate one value against its ParamSpec: (normalised value, None) or (None, message).

    Normalising: integral floats become ints for int parameters, ints become floats for float parameters,
    enum values are matched case-insensitively and given their canonical spelling, text is stripped.
    """
    name = p.name
    if value is None:
        if p.default is None:
            return None, None  # a nullable parameter (seed): None means "random"
        return None, f"{name} needs a value; leave it out to inherit it"
    if p.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            return None, f"{name} must be a whole number, not {_fmt(value)} ({_type_name(value)})"
        if isinstance(value, float | Decimal):
            if not (value.is_finite() if isinstance(value, Decimal) else math.isfinite(value)):
                return None, f"{name} must be a whole number, not {_fmt(value)}"
            if value != int(value):
                return None, f"{name} must be a whole number, not {_fmt(value)}"
            value = int(value)
        return value, _check_range(spec, p, value)
    if p.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            return None, f"{name} must be a number, not {_fmt(value)} ({_type_name(value)})"
        number = float(value)
        if not math.isfinite(number):
            return None, f"{name} must be a finite number, not {_fmt(value)}"
        return number, _check_range(spec, p, number)
    if p.kind == "bool":
        if not isinstance(value, bool):
            return None, f"{name} must be true or false, not {_fmt(value)} ({_type_name(value)})"
        return value, None
    if p.kind == "enum":
        if isinstance(value, str):
            for choice in p.choices:
                if value.strip().lower() == choice.lower():
                    return choice, None
        return None, f"{name} {_fmt(value)} is not one of {', '.join(p.choices)}"
    if p.kind == "size":
        if not isinstance(value, str):
            return None, f"{name} must be text such as 1024x768, 16:9 or square_hd, not {_type_name(value)}"
        try:
            parse_size(value)
            resolve_size(spec, value)
        except SizeError as exc:
            return None, f"{name}: {exc}"
        return value.strip(), None
    # free text
    if name == "negative_prompt":
        problem = prompt_problem(value, field=name, allow_empty=True)
        if problem is not None:
            return None, problem
        return str(value).replace("\r\n", "\n").strip(), None
    problem = prompt_problem(value, field=name, allow_empty=False)
    if problem is None and len(str(value).strip()) > _STR_PARAM_MAX_CHARS:
        problem = f"{name} is longer than {_STR_PARAM_MAX_CHARS} characters"
    if problem is not None:
        return None, problem
    return str(value).strip(), None


def _unknown_param(spec: ProviderSpec, name: object) -> str:
    return f"unknown parameter {name!r} for {spec.id}; its parameters are: {', '.join(spec.params)}"


def clean_params(provider_id: str, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(normalised values of the valid params, field errors keyed by param name). Collects every error."""
    spec = PROVIDERS.get(provider_id)
    if spec is None:
        return {}, {"provider": _unknown_provider(provider_id)}
    if not isinstance(params, Mapping):
        return {}, {"params": f"parameters must be a mapping of names to values, not {_type_name(params)}"}
    cleaned: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, value in params.items():
        p = spec.params.get(name) if isinstance(name, str) else None
        if p is None:
            errors[str(name)] = _unknown_param(spec, name)
            continue
        normal, problem = check_param(spec, p, value)
        if problem is not None:
            errors[name] = problem
        else:
            cleaned[name] = normal
    return cleaned, errors


def validate_params(provider_id: str, params: Mapping[str, Any]) -> dict[str, str]:
    """Field errors for a set of canonical parameters of `provider_id` (empty = all valid)."""
    return clean_params(provider_id, params)[1]


def key_destination_error(spec: ProviderSpec, p: ParamSpec, value: Any) -> str | None:
    """For a parameter whose URL receives the provider's key (HF `model`): why this value may not, or None.

    Checked where people give values and where requests are resolved, not when stored settings are loaded:
    the allowed endpoints live in the environment, and a change there must not make the settings unreadable."""
    if not p.receives_key or not isinstance(value, str) or not looks_like_url(value):
        return None
    problem = key_destination_problem(spec.id, value.strip())
    return None if problem is None else f"{p.name}: {problem}"


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------

# Pydantic's own messages ("Input should be less than or equal to 1000") name neither the field nor the value.
_PYDANTIC_BOUNDS = {
    "less_than_equal": ("le", "above the maximum of"),
    "less_than": ("lt", "must be below"),
    "greater_than_equal": ("ge", "below the minimum of"),
    "greater_than": ("gt", "must be above"),
}

_PYDANTIC_TYPES = {
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "decimal_type": "an amount such as 5.00",
    "decimal_parsing": "an amount such as 5.00",
    "string_type": "text",
    "dict_type": "a mapping",
}


def field_errors_from_validation(
    exc: ValidationError, *, prefix: str = "", allowed: tuple[str, ...] = ()
) -> dict[str, str]:
    """A pydantic ValidationError as {dotted field path: message naming the field and the value}."""
    out: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        path = prefix + ".".join(loc) if loc else prefix.rstrip(".") or "settings"
        name = loc[-1] if loc else "settings"
        bound = _PYDANTIC_BOUNDS.get(err["type"])
        ctx = err.get("ctx") or {}
        if bound is not None and bound[0] in ctx:
            msg = f"{name} {_fmt(err['input'])} is {bound[1]} {_fmt(ctx[bound[0]])}"
        elif err["type"] == "extra_forbidden":
            msg = f"unknown setting {name!r}"
            if allowed:
                msg += f"; settings are: {', '.join(allowed)}"
        elif err["type"] in _PYDANTIC_TYPES:
            msg = f"{name} must be {_PYDANTIC_TYPES[err['type']]}, not {_fmt(err['input'])}"
        elif err["type"] == "missing":
            msg = f"{name} is required"
        else:
            text = err["msg"].removeprefix("Value error, ")
            msg = text if text.startswith(name) else f"{name}: {text}"
        out.setdefault(path, msg)
    return out


def _valid_negative_prompt(value: str | None) -> str | None:
    """A negative prompt as the global settings and user preferences store it (ValueError when refused)."""
    if value is None:
        return None
    problem = prompt_problem(value, field="negative_prompt", allow_empty=True)
    if problem is not None:
        raise ValueError(problem)
    return value.replace("\r\n", "\n").strip()


def _valid_size(value: str | None) -> str | None:
    """A provider-independent canonical size (checked against a provider only at resolution)."""
    if value is None:
        return None
    try:
        parse_size(value)
    except SizeError as exc:
        raise ValueError(str(exc)) from None
    return value.strip()


def clean_preset_overrides(value: Any) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, str]]:
    """Validate edited preset values (preset -> provider -> {param: value}) with the one parameter validator:
    (normalised overrides, field errors keyed `preset_overrides.<preset>.<provider>[.<param>]`). Collects every
    error. A preset never sets image_size or num_images (core.presets says why); empty entries are dropped."""
    field = "preset_overrides"
    if not isinstance(value, Mapping):
        return {}, {field: f"{field} must be a mapping of preset -> provider -> parameters, not {_type_name(value)}"}
    cleaned: dict[str, dict[str, dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    for preset, by_provider in value.items():
        try:
            key = normalize_preset(preset)
        except UnknownPreset as exc:
            errors[f"{field}.{preset}"] = str(exc)
            continue
        if not isinstance(by_provider, Mapping):
            errors[f"{field}.{key}"] = f"preset {key} must map providers to parameters, not {_type_name(by_provider)}"
            continue
        for provider_id, params in by_provider.items():
            where = f"{field}.{key}.{provider_id}"
            spec = PROVIDERS.get(provider_id)
            if spec is None:
                errors[where] = _unknown_provider(provider_id)
                continue
            if not isinstance(params, Mapping):
                errors[where] = f"parameters must be a mapping of names to values, not {_type_name(params)}"
                continue
            forbidden = {n for n in params if n in PRESET_FORBIDDEN_PARAMS}
            for name in sorted(forbidden):
                errors[f"{where}.{name}"] = (
                    f"a preset never sets {name}: size and count decide the bill, so pick them explicitly"
                )
            good, problems = clean_params(provider_id, {n: v for n, v in params.items() if n not in forbidden})
            errors.update({f"{where}.{n}": msg for n, msg in problems.items()})
            for name, normal in good.items():
                problem = key_destination_error(spec, spec.params[name], normal)
                if problem is not None:
                    errors[f"{where}.{name}"] = problem
            kept = {n: v for n, v in good.items() if f"{where}.{n}" not in errors}
            if kept:
                cleaned.setdefault(key, {}).setdefault(provider_id, {}).update(kept)
    ordered = {p: dict(sorted(cleaned[p].items())) for p in PRESET_NAMES if p in cleaned}
    return ordered, errors


def _valid_preset(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return normalize_preset(value)
    except UnknownPreset as exc:
        raise ValueError(str(exc)) from None


def _valid_preferred_preset(value: str | None) -> str | None:
    """A user's preferred preset; "none" (or "") is kept as "none": no preset, even over the admins' default."""
    if value is not None and value.strip().lower() in NO_PRESET:
        return "none"
    return _valid_preset(value)


# The provider-independent fields GlobalSettings and UserPreferenceValues share, validated the same way in both.
NegativePrompt = Annotated[str | None, AfterValidator(_valid_negative_prompt)]
CanonicalSize = Annotated[str | None, AfterValidator(_valid_size)]
DefaultPreset = Annotated[str | None, AfterValidator(_valid_preset)]
PreferredPreset = Annotated[str | None, AfterValidator(_valid_preferred_preset)]


class GlobalSettings(BaseModel):
    """Settings shared by all providers. A generation field left None is not set: the provider's own settings
    or the catalog decide. Ranges here are the widest any provider allows; `resolve_effective` fits a value to
    each provider's own limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    negative_prompt: NegativePrompt = None
    num_inference_steps: StrictInt | None = Field(None, ge=1, le=_GLOBAL_MAX_STEPS)
    guidance_scale: StrictFloat | None = Field(None, ge=0.0, le=_GLOBAL_MAX_GUIDANCE)
    image_size: CanonicalSize = None
    """Canonical size: a preset (square_hd), an aspect ratio (16:9) or WIDTHxHEIGHT."""
    num_images: StrictInt | None = Field(None, ge=1, le=_GLOBAL_MAX_IMAGES)
    seed: StrictInt | None = Field(None, ge=0, le=SEED_MAX)
    enable_safety_checker: StrictBool | None = None
    sync_mode: StrictBool | None = None

    request_timeout_s: StrictFloat = Field(DEFAULT_REQUEST_TIMEOUT_S, gt=0, le=MAX_REQUEST_TIMEOUT_S)
    """Deadline for one provider attempt; a provider's own setting overrides it. Strict like every parameter:
    `true` and `"30"` are refused (a whole number such as 30 is a number)."""

    # Circuit breakers and health (read by core.generation.breaker and core.generation.health).
    breaker_consecutive_failures: StrictInt = Field(5, ge=1, le=1000)
    """A provider's breaker opens after this many failures in a row (failures that say something about it)."""
    breaker_failure_rate: StrictFloat = Field(0.5, gt=0, le=1)
    """...or when at least this share of its requests in the current window failed,"""
    breaker_min_requests: StrictInt = Field(10, ge=1, le=100_000)
    """...counted only once the window holds this many requests."""
    breaker_window_s: StrictInt = Field(60, ge=1, le=86_400)
    """Length of the fixed failure-rate window; its counters start again when a new window begins."""
    breaker_cooldown_s: StrictInt = Field(30, ge=1, le=86_400)
    """An open breaker refuses requests this long before one request may probe the provider."""
    breaker_max_cooldown_s: StrictInt = Field(600, ge=1, le=86_400)
    """Failed probes double the cooldown, up to this."""
    breaker_probe_lease_s: StrictInt = Field(60, ge=1, le=86_400)
    """A probe's owner must report within this; after it another process may probe (its owner died)."""
    health_probe_interval_s: StrictInt = Field(60, ge=10, le=86_400)
    """How often the worker runs each provider's cheap health probe."""

    # Routing defaults (read by core.routing).
    default_preset: DefaultPreset = None
    """Quality preset `resolve_effective` applies when a request names none (None = no preset)."""
    fallback_enabled: StrictBool = True
    """On a retryable failure, try the next candidate provider."""
    max_attempts: StrictInt = Field(3, ge=1, le=MAX_ROUTING_ATTEMPTS)
    """Provider attempts per request, the first included."""
    routing_policy: RoutingPolicyName = "priority"
    """How a request that names no provider orders them (core.generation.routing): priority (higher first),
    cheapest (each priced at its own parameters), fastest (recent p50 latency) or explicit (the default
    provider first, then the others by priority)."""
    premium_in_auto_routing: StrictBool = False
    """Premium providers (Ideogram) are used only when a request names them, unless this is on."""
    fallback_on_safety: StrictBool = False
    """A safety rejection stops the request unless this is on (another provider might render what one refused)."""
    retries_per_provider: StrictInt = Field(1, ge=0, le=MAX_ROUTING_ATTEMPTS)
    """Retries of a transiently failing provider (rate limit, unavailable, bad response, timeout) before fallback."""
    retry_backoff_s: StrictFloat = Field(0.5, gt=0, le=MAX_RETRY_BACKOFF_S)
    """First retry's backoff; it doubles with every retry of the same provider, with jitter."""
    retry_backoff_max_s: StrictFloat = Field(8.0, gt=0, le=MAX_RETRY_BACKOFF_S)
    """The longest backoff. A provider asking for a longer wait (Retry-After) is left for the next candidate."""

    # Spend intelligence (core.spend).
    target_cost_per_image_usd: Decimal = Field(
        DEFAULT_TARGET_COST_PER_IMAGE_USD, exclude_if=lambda value: value == DEFAULT_TARGET_COST_PER_IMAGE_USD
    )
    """What one image should cost; reports compare against it and the optimizer aims at it. Left out of the
    stored form at its default, so versions saved before it existed compare equal."""
    user_preference_fields: tuple[str, ...] = Field(
        USER_PREFERENCE_FIELDS, exclude_if=lambda value: tuple(value) == USER_PREFERENCE_FIELDS
    )
    """What users may set as their own defaults (a subset of image_size, preset, negative_prompt)."""

    # Quality presets (core.presets).
    preset_overrides: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict, exclude_if=lambda value: not value
    )
    """Edited preset values, preset -> provider -> {parameter: value}, applied over the built-in ones (never
    image_size or num_images). Left out of the stored form when empty, so older versions compare equal."""

    @field_validator("preset_overrides", mode="before")
    @classmethod
    def _preset_overrides(cls, value: Any) -> dict[str, dict[str, dict[str, Any]]]:
        cleaned, errors = clean_preset_overrides(value)
        if errors:
            raise ValueError("; ".join(f"{path}: {msg}" for path, msg in errors.items()))
        return cleaned

    def preset_values(self, preset: str, provider_id: str) -> dict[str, Any]:
        """The admins' edits of one preset for one provider (empty when it is built-in there)."""
        return dict(self.preset_overrides.get(preset, {}).get(provider_id, {}))

    @field_validator("target_cost_per_image_usd", mode="before")
    @classmethod
    def _target_cost(cls, value: Any) -> Decimal:
        return exact_decimal(value, what="target_cost_per_image_usd", maximum=MAX_UNIT_PRICE_USD, above_minimum=True)

    @field_validator("user_preference_fields", mode="before")
    @classmethod
    def _preference_fields(cls, value: Any) -> Any:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ValueError(f"user_preference_fields is a list of {', '.join(USER_PREFERENCE_FIELDS)}")
        unknown = [v for v in value if v not in USER_PREFERENCE_FIELDS]
        if unknown:
            raise ValueError(
                f"user_preference_fields: {', '.join(map(repr, unknown))} cannot be a user preference; "
                f"choose from {', '.join(USER_PREFERENCE_FIELDS)}"
            )
        return tuple(dict.fromkeys(value))

    @field_validator("routing_policy", mode="before")
    @classmethod
    def _routing_policy(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    def generation_params(self) -> dict[str, Any]:
        """The generation parameters this level sets (canonical names; unset ones left out)."""
        return {n: getattr(self, n) for n in COMMON_PARAMS if getattr(self, n) is not None}


class UserPreferenceValues(BaseModel):
    """A user's own defaults (core.preferences stores them): provider-independent like the global settings, so a
    size a provider cannot render falls back to the layers below with a note. None = not set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: CanonicalSize = None
    preset: PreferredPreset = None
    negative_prompt: NegativePrompt = None

    def allowed(self, fields: tuple[str, ...]) -> dict[str, Any]:
        """The values set here that `fields` (what the admins allow) admits."""
        return {
            name: getattr(self, name)
            for name in USER_PREFERENCE_FIELDS
            if name in fields and getattr(self, name) is not None
        }


def validate_global_settings(data: Mapping[str, Any]) -> GlobalSettings:
    """GlobalSettings from user data, or InvalidInput with every field error."""
    if not isinstance(data, Mapping):
        raise InvalidInput("global settings must be a mapping", {"settings": "expected a mapping of settings"})
    secret_errors = keys_in(dict(data))
    if secret_errors:
        raise InvalidInput("global settings contain an API key", secret_errors)
    raw = dict(data)
    errors: dict[str, str] = {}
    if "preset_overrides" in raw:  # checked here too, so each bad value gets its own field error
        raw["preset_overrides"], errors = clean_preset_overrides(raw["preset_overrides"])
    try:
        settings = GlobalSettings.model_validate(raw)
    except ValidationError as exc:
        errors.update(field_errors_from_validation(exc, allowed=tuple(GlobalSettings.model_fields)))
    if errors:
        raise InvalidInput(f"global settings are not valid ({len(errors)} problem(s))", errors) from None
    return settings


class ProviderSettings(BaseModel):
    """Settings for one provider. `params` holds only the generation parameters set at this level (canonical
    names from core.catalog); everything else is inherited. `priority` and `auto_routing` default from the
    catalog (premium providers are not routed to automatically unless an admin allows it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str
    params: dict[str, Any] = Field(default_factory=dict)
    priority: StrictInt = Field(50, ge=0, le=MAX_PRIORITY)
    """Higher is tried first."""
    active: StrictBool = True
    is_default: StrictBool = False
    auto_routing: StrictBool = True
    """May automatic routing pick this provider? Defaults to False for premium providers."""
    request_timeout_s: StrictFloat | None = Field(None, gt=0, le=MAX_REQUEST_TIMEOUT_S)
    daily_cost_limit_usd: Decimal | None = Field(None, ge=0)
    """None = no provider-level daily limit. Whole micro-dollars, at most core.money.MAX_LIMIT_USD."""
    max_in_flight: StrictInt | None = Field(None, ge=1, le=MAX_IN_FLIGHT, exclude_if=lambda value: value is None)
    """Requests in flight at once across every process (core.generation.limits); None = the catalog's limit
    (Ideogram: 10 per account), if any. Left out of the stored form when None, so older versions compare equal."""

    @model_validator(mode="before")
    @classmethod
    def _catalog_defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            spec = PROVIDERS.get(data.get("provider"))  # type: ignore[arg-type]
            if spec is not None:
                data = dict(data)
                data.setdefault("priority", spec.default_priority)
                data.setdefault("auto_routing", not spec.premium)
        return data

    @field_validator("provider")
    @classmethod
    def _provider(cls, value: str) -> str:
        if value not in PROVIDERS:
            raise ValueError(_unknown_provider(value))
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        provider = info.data.get("provider")
        if provider is None:  # the provider itself was invalid; that error is already reported
            return value
        cleaned, errors = clean_params(provider, value)
        if errors:
            raise ValueError("; ".join(errors.values()))
        return cleaned

    @field_validator("daily_cost_limit_usd", mode="before")
    @classmethod
    def _bounded_limit(cls, value: Any) -> Decimal | None:
        return None if value is None else money_limit(value, "daily_cost_limit_usd")

    @property
    def spec(self) -> ProviderSpec:
        return PROVIDERS[self.provider]

    @property
    def daily_cost_limit_micros(self) -> int | None:
        return None if self.daily_cost_limit_usd is None else usd_to_micros(self.daily_cost_limit_usd)

    @classmethod
    def defaults(cls, provider_id: str) -> ProviderSettings:
        return default_provider_settings(provider_id)


def default_provider_settings(provider_id: str) -> ProviderSettings:
    """A provider's settings before any admin changed them: no params set (all inherited from the catalog),
    the catalog's priority, active, automatic routing unless premium."""
    if provider_id not in PROVIDERS:
        raise InvalidInput(_unknown_provider(provider_id), {"provider": _unknown_provider(provider_id)})
    return ProviderSettings(provider=provider_id)


def validate_provider_settings(provider_id: str, data: Mapping[str, Any]) -> ProviderSettings:
    """ProviderSettings for `provider_id` from user data (missing fields take their defaults), or InvalidInput
    whose `field_errors` holds every problem: `params.<name>` for parameters, the field name otherwise."""
    if provider_id not in PROVIDERS:
        msg = _unknown_provider(provider_id)
        raise InvalidInput(msg, {"provider": msg})
    if not isinstance(data, Mapping):
        msg = f"settings must be a mapping of fields to values, not {_type_name(data)}"
        raise InvalidInput(msg, {"settings": msg})
    raw = dict(data)
    errors: dict[str, str] = {}
    given = raw.pop("provider", provider_id)
    if given != provider_id:
        errors["provider"] = f"these settings are for {given!r}, not {provider_id!r}"
    params = raw.pop("params", None) or {}
    cleaned: dict[str, Any] = {}
    if not isinstance(params, Mapping):
        errors["params"] = f"params must be a mapping of parameter names to values, not {_type_name(params)}"
    else:
        cleaned, param_errors = clean_params(provider_id, params)
        errors.update({f"params.{name}": msg for name, msg in param_errors.items()})
        spec = PROVIDERS[provider_id]
        for name, value in cleaned.items():
            problem = key_destination_error(spec, spec.params[name], value)
            if problem is not None:
                errors[f"params.{name}"] = problem
    errors.update(keys_in({"params": params, **raw}))
    try:
        ProviderSettings.model_validate({**raw, "provider": provider_id, "params": {}})
    except ValidationError as exc:
        errors.update(field_errors_from_validation(exc, allowed=tuple(ProviderSettings.model_fields)))
    if errors:
        raise InvalidInput(f"{provider_id} settings are not valid ({len(errors)} problem(s))", errors)
    return ProviderSettings.model_validate({**raw, "provider": provider_id, "params": cleaned})


# --------------------------------------------------------------------------------------------------------------
# The resolver
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaggedValue:
    """A parameter value and the layer it came from: catalog, global, provider, preset:<name> or request."""

    value: Any
    source: str


def describe_source(source: str) -> str:
    """A layer name in words, for messages and the UI ("the Fast preset")."""
    if source.startswith(PRESET_SOURCE_PREFIX):
        name = source.removeprefix(PRESET_SOURCE_PREFIX)
        edited = name.endswith(PRESET_EDITED_SUFFIX)
        name = name.removesuffix(PRESET_EDITED_SUFFIX)
        return f"the {name.title()} preset" + (" (edited)" if edited else "")
    return _SOURCE_WORDS.get(source, source)


class EffectiveParams(BaseModel):
    """The parameters one request will run with, each tagged with where it came from. Immutable."""

    model_config = ConfigDict(frozen=True)

    provider: str
    prompt: str
    params: dict[str, TaggedValue]
    timeout: TaggedValue
    preset: str | None = None
    notes: tuple[str, ...] = ()
    """What was adjusted on the way (a global value clamped to this provider's range, a size rendered as
    the nearest one the provider offers)."""

    def values(self) -> dict[str, Any]:
        """Parameter name -> value, as an adapter takes them."""
        return {name: tagged.value for name, tagged in self.params.items()}

    def value_of(self, name: str) -> Any:
        return self._get(name).value

    def source_of(self, name: str) -> str:
        return self._get(name).source

    def sources(self) -> dict[str, str]:
        return {name: tagged.source for name, tagged in self.params.items()}

    @property
    def request_timeout_s(self) -> float:
        return float(self.timeout.value)

    def _get(self, name: str) -> TaggedValue:
        try:
            return self.params[name]
        except KeyError:
            raise KeyError(
                f"{self.provider} has no parameter {name!r}; its parameters are: {', '.join(self.params)}"
            ) from None


_SKIP = object()


def _fit_global(spec: ProviderSpec, p: ParamSpec, value: Any) -> tuple[Any, str | None]:
    """A global value fitted to this provider's limits: (value or _SKIP, note or None)."""
    if p.kind in ("int", "float") and value is not None:
        if p.maximum is not None and value > p.maximum:
            fitted = int(p.maximum) if p.kind == "int" else float(p.maximum)
            return fitted, (
                f"{p.name} {_fmt(value)} from the global settings is above {spec.id}'s maximum of "
                f"{_fmt(p.maximum)}; using {_fmt(fitted)}"
            )
        if p.minimum is not None and value < p.minimum:
            fitted = int(p.minimum) if p.kind == "int" else float(p.minimum)
            return fitted, (
                f"{p.name} {_fmt(value)} from the global settings is below {spec.id}'s minimum of "
                f"{_fmt(p.minimum)}; using {_fmt(fitted)}"
            )
    if p.kind == "size":
        try:
            resolve_size(spec, value)
        except SizeError as exc:
            return _SKIP, f"global image_size {value!r} does not fit {spec.id} ({exc}); using its own default"
    return value, None


def resolve_effective(
    provider_id: str,
    *,
    global_settings: GlobalSettings | None,
    provider_settings: ProviderSettings | None,
    preset: str | None,
    overrides: Mapping[str, Any] | None,
    prompt: str,
    user_preferences: UserPreferenceValues | None = None,
) -> EffectiveParams:
    """Merge catalog defaults -> global -> provider settings -> user preferences -> preset -> request overrides
    for one provider, and validate the result (prompt included). `preset` None takes the user's preferred
    preset, else the global settings' `default_preset`; "none" (or "") asks for no preset even then. User
    preferences apply only to the fields the global settings allow (`user_preference_fields`); a preferred
    size this provider cannot render is left out with a note. Raises InvalidInput with every field error; keys
    are parameter names, `prompt`, `preset` or `provider`."""
    spec = PROVIDERS.get(provider_id)
    if spec is None:
        msg = _unknown_provider(provider_id)
        raise InvalidInput(msg, {"provider": msg})
    errors: dict[str, str] = {}
    notes: list[str] = []
    global_notes: dict[str, str] = {}

    merged: dict[str, TaggedValue] = {name: TaggedValue(p.default, SOURCE_CATALOG) for name, p in spec.params.items()}
    timeout = TaggedValue(DEFAULT_REQUEST_TIMEOUT_S, SOURCE_CATALOG)

    if global_settings is not None:
        for name, value in global_settings.generation_params().items():
            p = spec.params.get(name)
            if p is None:  # e.g. sync_mode on the qwen Space: global values apply where they make sense
                continue
            fitted, note = _fit_global(spec, p, value)
            if note:
                global_notes[name] = note
            if fitted is not _SKIP:
                merged[name] = TaggedValue(fitted, SOURCE_GLOBAL)
        timeout = TaggedValue(global_settings.request_timeout_s, SOURCE_GLOBAL)

    if provider_settings is not None:
        if provider_settings.provider != provider_id:
            msg = f"the provider settings given are for {provider_settings.provider!r}, not {provider_id!r}"
            raise InvalidInput(msg, {"provider": msg})
        for name, value in provider_settings.params.items():
            merged[name] = TaggedValue(value, SOURCE_PROVIDER)
        if provider_settings.request_timeout_s is not None:
            timeout = TaggedValue(provider_settings.request_timeout_s, SOURCE_PROVIDER)

    user_values: dict[str, Any] = {}
    if user_preferences is not None:
        allowed = global_settings.user_preference_fields if global_settings is not None else USER_PREFERENCE_FIELDS
        user_values = user_preferences.allowed(allowed)
        for name, value in user_values.items():
            p = spec.params.get(name)
            if p is None:  # preset (below), or a parameter this provider lacks
                continue
            if p.kind == "size":
                try:
                    resolve_size(spec, value)
                except SizeError as exc:
                    notes.append(f"your preferred image_size {value!r} does not fit {spec.id} ({exc}); not used")
                    continue
            merged[name] = TaggedValue(value, SOURCE_USER)

    preset_key: str | None = None
    if preset is None and "preset" in user_values:
        preset = user_values["preset"]
        if preset not in NO_PRESET:
            notes.append(f"preset {preset} from your preferences")
        else:
            preset = None
    elif preset is None and global_settings is not None:
        preset = global_settings.default_preset
    elif isinstance(preset, str) and preset.strip().lower() in NO_PRESET:
        preset = None
    if preset is not None:
        try:
            preset_key = normalize_preset(preset)
        except UnknownPreset as exc:
            errors["preset"] = str(exc)
        else:
            for name, value in preset_params(preset_key, provider_id).items():
                merged[name] = TaggedValue(value, PRESET_SOURCE_PREFIX + preset_key)
            if global_settings is not None:  # the admins' edits of this preset, over its built-in values
                for name, value in global_settings.preset_values(preset_key, provider_id).items():
                    merged[name] = TaggedValue(value, PRESET_SOURCE_PREFIX + preset_key + PRESET_EDITED_SUFFIX)

    if overrides:
        cleaned, override_errors = clean_params(provider_id, overrides)
        errors.update(override_errors)
        for name, value in cleaned.items():
            merged[name] = TaggedValue(value, SOURCE_REQUEST)

    # Everything merged is checked again: stored provider settings may predate a catalog change.
    final: dict[str, TaggedValue] = {}
    for name, tagged in merged.items():
        if name in errors:
            continue
        normal, problem = check_param(spec, spec.params[name], tagged.value)
        if problem is None:
            problem = key_destination_error(spec, spec.params[name], normal)
        if problem is not None:
            errors[name] = f"{problem} (set by {describe_source(tagged.source)})"
        else:
            final[name] = TaggedValue(normal, tagged.source)

    prompt_error = prompt_problem(prompt, field="prompt")
    if prompt_error is not None:
        errors["prompt"] = prompt_error
    if errors:
        raise InvalidInput(
            f"the request for {provider_id} is not valid ({len(errors)} problem(s))", dict(sorted(errors.items()))
        )

    # A note about a global value matters only if a later layer did not replace that value anyway.
    notes.extend(
        note
        for name, note in global_notes.items()
        if name not in final or final[name].source in (SOURCE_GLOBAL, SOURCE_CATALOG)
    )
    size = final.get("image_size")
    if size is not None:
        resolved = resolve_size(spec, size.value)
        if not resolved.exact and resolved.note:
            notes.append(resolved.note)

    return EffectiveParams(
        provider=provider_id,
        prompt=prompt.replace("\r\n", "\n").strip(),
        params=final,
        timeout=timeout,
        preset=preset_key,
        notes=tuple(notes),
    )
