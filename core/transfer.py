"""Export and import of settings and prices as one JSON document.

Format (`format_version` 1):

    {
      "format": "imagegate.settings",
      "format_version": 1,
      "exported_at": "2026-11-27T10:00:00Z",          # informational
      "global_settings": { ...core.settings.GlobalSettings... } | null,
      "providers": { "<provider id>": { ...core.settings.ProviderSettings... }, ... },
      "prices":    { "<provider id>": { ...core.pricing.ProviderPrice... }, ... }
    }

Every section is optional on import; a provider or price left out is left alone (import never deletes).
Export writes the current version of every configured provider's settings, the global settings and each
provider's latest price version. Money and prices are exact decimal strings. API keys are never part of it:
they are not settings, and the export is checked for any configured key value before it is returned.

Import is: parse defensively (size limit, strict UTF-8, no duplicate keys, no NaN/Infinity, bounded numbers,
depth and strings, no control characters, no configured API key anywhere), validate everything with the same
rules as the console, then either show the plan (dry run: what would change, per provider and field, with the
old and new values) or apply it in the caller's transaction as new versions with audit rows. Any problem
raises InvalidInput before anything is written, so a bad file changes nothing. Text such as `<script>` is kept
as text: nothing here renders it. Every step is linear in the size of the file: a hostile file costs at most
a megabyte's worth of work.
"""

from __future__ import annotations

import json
import os
import re
import stat
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from common.errors import InvalidInput, NotFound
from core import price_store, settings_service
from core.authz import authorize
from core.catalog import PROVIDERS
from core.keys import configured_secrets, keys_in, redact
from core.money import WrittenNumber
from core.pricing import ProviderPrice, parse_price
from core.security import SETTINGS_EDITORS, Actor
from core.settings import GlobalSettings, ProviderSettings, field_errors_from_validation, validate_global_settings
from core.settings_service import FieldChange, diff_settings

FORMAT_NAME = "imagegate.settings"
FORMAT_VERSION = 1
MAX_IMPORT_BYTES = 1024 * 1024
MAX_DEPTH = 12
"""The format nests 5 levels (document, section, provider, tiers, tier); anything far deeper is hostile."""
MAX_NUMBER_CHARS = 40
MAX_STRING_CHARS = 10_000
MAX_ERRORS_SHOWN = 50
MAX_VALUE_CHARS_SHOWN = 80
"""A value in the plan is cut to this: a 10,000-character source would bury the rest of the diff."""
_CONTROL_OK = {"\n", "\r", "\t"}


class ExportDocument(BaseModel):
    """The top-level shape, checked before any section is validated."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["imagegate.settings"]
    format_version: Literal[1]
    exported_at: datetime | None = None
    global_settings: dict[str, Any] | None = None
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    prices: dict[str, dict[str, Any]] = Field(default_factory=dict)


@dataclass(frozen=True)
class ImportDocument:
    """A validated import: typed settings and prices, ready to plan or apply."""

    global_settings: GlobalSettings | None
    providers: dict[str, ProviderSettings]
    prices: dict[str, ProviderPrice]


@dataclass(frozen=True)
class PlanItem:
    kind: Literal["global_settings", "provider_settings", "price"]
    target: str
    """The provider id, or "global"."""
    action: Literal["create", "update", "unchanged"]
    changes: tuple[FieldChange, ...]
    note: str = ""


@dataclass(frozen=True)
class ImportPlan:
    items: tuple[PlanItem, ...]

    @property
    def changed(self) -> list[PlanItem]:
        return [item for item in self.items if item.action != "unchanged"]

    @property
    def has_changes(self) -> bool:
        return bool(self.changed)

    def summary(self) -> str:
        """Each changed item, then each of its changed fields with the old and the new value:

            update provider_settings fal-qwen
              priority: 98 -> 42
        """
        if not self.has_changes:
            return "nothing would change"
        lines = []
        for item in self.changed:
            label = "global settings" if item.kind == "global_settings" else f"{item.kind} {item.target}"
            lines.append(f"{item.action} {label}" + (f" ({item.note})" if item.note else ""))
            lines.extend(f"  {change.field}: {show_value(change.before)} -> {show_value(change.after)}"
                         for change in item.changes)
        return "\n".join(lines)


def show_value(value: Any) -> str:
    """A value of the plan for a terminal or a page: JSON (so "5" and 5 differ), `(not set)` for nothing,
    cut to MAX_VALUE_CHARS_SHOWN, escapes for anything that is not printable."""
    if value is None:
        return "(not set)"
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= MAX_VALUE_CHARS_SHOWN else text[: MAX_VALUE_CHARS_SHOWN - 1] + "…"


# --- export ----------------------------------------------------------------------------------------------------


def export_document(session: Session, actor: Actor) -> dict[str, Any]:
    authorize(session, actor, *SETTINGS_EDITORS, action="export settings", lock=False)
    providers = {
        view.provider: settings_service.settings_json(view.settings)
        for view in settings_service.list_provider_settings(session)
    }
    prices: dict[str, Any] = {}
    for provider in PROVIDERS:
        latest = price_store.latest_price_version(session, provider)
        if latest is not None:
            prices[provider] = price_store.price_json(latest.price)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "exported_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "global_settings": settings_service.settings_json(settings_service.get_global_settings(session).settings),
        "providers": dict(sorted(providers.items())),
        "prices": prices,
    }


def export_json(session: Session, actor: Actor) -> str:
    """The export as pretty JSON text. Raises RuntimeError rather than ever emit a configured API key."""
    text = json.dumps(export_document(session, actor), indent=2, ensure_ascii=False) + "\n"
    if any(secret in text for _, secret in configured_secrets()):
        raise RuntimeError("refusing to export: the document would contain a configured API key")
    return text


# --- parsing ---------------------------------------------------------------------------------------------------


def _refuse(message: str, field: str = "file") -> InvalidInput:
    return InvalidInput(f"cannot import this file: {message}", {field: message})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _refuse(f"the key {key!r} appears twice in one object")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise _refuse(f"{name} is not a number JSON allows")


def _bounded_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _refuse(f"a number with {len(text)} digits is far too large")
    return int(text)


def _bounded_float(text: str) -> float:
    """A JSON number with a fraction or exponent, as a float that remembers its text: parameters get a float,
    money gets exactly the decimal written (core.money.exact_decimal)."""
    if len(text) > MAX_NUMBER_CHARS:
        raise _refuse(f"the number {text[:20]}... is too long")
    value = WrittenNumber(text)
    if value in (float("inf"), float("-inf")):
        raise _refuse(f"the number {text} is too large")
    return value


def _check_tree(document: Any) -> None:
    """Depth, string length and control characters, walked without recursion."""
    stack: list[tuple[Any, int, str]] = [(document, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise _refuse(f"the data is nested more than {MAX_DEPTH} levels deep (at {path or 'the top'})")
        if isinstance(node, dict):
            for key, value in node.items():
                _check_text(key, path or "the top level")
                stack.append((value, depth + 1, f"{path}.{key}" if path else key))
        elif isinstance(node, list):
            stack.extend((value, depth + 1, f"{path}[{i}]") for i, value in enumerate(node))
        elif isinstance(node, str):
            _check_text(node, path)


def _check_text(text: str, path: str) -> None:
    if len(text) > MAX_STRING_CHARS:
        raise _refuse(f"the text at {path} is longer than {MAX_STRING_CHARS} characters", path or "file")
    for char in text:
        code = ord(char)
        if unicodedata.category(char) == "Cc" and char not in _CONTROL_OK:
            raise _refuse(f"the text at {path} contains the control character U+{code:04X}", path or "file")
        if 0xD800 <= code <= 0xDFFF:
            raise _refuse(f"the text at {path} contains an unpaired surrogate (U+{code:04X})", path or "file")


_STRUCTURE = re.compile(r'[\[\]{}"]')
_STRING_REST = re.compile(r'(?:[^"\\]++|\\.)*+"', re.DOTALL)
"""The rest of a JSON string after its opening quote. Possessive (no backtracking) and anchored where the
string starts, so each character is looked at once: an unclosed string costs one pass, not one per quote."""


def _check_depth(text: str) -> None:
    """Refuse deep nesting before json.loads sees it: its C parser recurses once per level, and a recursion
    error raised deep inside it can leave CPython 3.11's recursion accounting off for the rest of the process.

    One left-to-right pass: brackets count, strings are skipped whole. (A single regex finding both strings and
    brackets retried its string alternative from every quote of an unclosed string: quadratic, 4 s for
    40,000 characters of `\\"`.)"""
    depth = 0
    position = 0
    while (token := _STRUCTURE.search(text, position)) is not None:
        char = token.group()
        position = token.end()
        if char == '"':
            rest = _STRING_REST.match(text, position)
            if rest is None:
                return  # an unclosed string: json.loads reports where
            position = rest.end()
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise _refuse(f"the data is nested more than {MAX_DEPTH} levels deep")
        else:
            depth -= 1


def _loads(raw: bytes | str) -> Any:
    if isinstance(raw, str) and len(raw) > MAX_IMPORT_BYTES:  # a character is at least one byte
        raise _refuse(f"it is over {MAX_IMPORT_BYTES:,} bytes; the limit is {MAX_IMPORT_BYTES:,} bytes")
    size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)
    if size > MAX_IMPORT_BYTES:
        raise _refuse(f"it is {size:,} bytes; the limit is {MAX_IMPORT_BYTES:,} bytes")
    if size == 0:
        raise _refuse("it is empty")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise _refuse(f"it is not UTF-8 text (byte {error.start})") from None
    else:
        text = raw
    _check_depth(text)
    try:
        document = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
            parse_float=_bounded_float,
        )
    except json.JSONDecodeError as error:
        raise _refuse(f"it is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}") from None
    except RecursionError:
        raise _refuse(f"the data is nested more than {MAX_DEPTH} levels deep") from None
    secret_errors = keys_in(document)
    if secret_errors:
        raise InvalidInput(
            "cannot import this file: it contains a configured API key; keys are never stored or imported",
            secret_errors,
        )
    _check_tree(document)
    return document


def read_import_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an import file: a regular file only, at most MAX_IMPORT_BYTES, read without ever blocking
    or reading more than the limit plus one byte. InvalidInput says what is wrong in words.

    Opened with O_NONBLOCK so a named pipe without a writer cannot hang us, then judged by fstat of what was
    opened (not a stat of the name, which could change in between): /dev/zero reports size 0 and would never
    end, a directory cannot be read, a pipe or socket has no size to check."""
    name = os.fsdecode(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise _refuse(f"there is no file {name}", "path") from None
    except PermissionError:
        raise _refuse(f"permission to read {name} is denied", "path") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL in the name
        raise _refuse(f"{name} cannot be opened: {getattr(error, 'strerror', None) or error}", "path") from None
    try:
        status = os.fstat(fd)
        kinds = {
            stat.S_ISDIR: "a directory",
            stat.S_ISFIFO: "a named pipe",
            stat.S_ISCHR: "a character device",
            stat.S_ISBLK: "a block device",
            stat.S_ISSOCK: "a socket",
        }
        kind = next((what for test, what in kinds.items() if test(status.st_mode)), None)
        if kind is not None or not stat.S_ISREG(status.st_mode):
            raise _refuse(f"{name} is {kind or 'not a regular file'}; import reads regular files only", "path")
        if status.st_size > MAX_IMPORT_BYTES:
            raise _refuse(f"{name} is {status.st_size:,} bytes; the limit is {MAX_IMPORT_BYTES:,} bytes", "path")
        chunks: list[bytes] = []
        remaining = MAX_IMPORT_BYTES + 1  # one byte more tells a file that grew past the limit
        while remaining > 0:
            try:
                chunk = os.read(fd, remaining)
            except OSError as error:
                raise _refuse(f"{name} cannot be read: {error.strerror or error}", "path") from None
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_IMPORT_BYTES:
        raise _refuse(f"{name} is over {MAX_IMPORT_BYTES:,} bytes; the limit is {MAX_IMPORT_BYTES:,} bytes", "path")
    return data


def _prefixed(error: InvalidInput, prefix: str) -> dict[str, str]:
    if not error.field_errors:
        return {prefix.rstrip("."): str(error)}
    return {f"{prefix}{key}": message for key, message in error.field_errors.items()}


def parse_import(raw: bytes | str) -> ImportDocument:
    """Parse and validate an import file completely; InvalidInput lists every problem found. No message quotes
    a configured key's value, even where it quotes the file (a key used as a mapping key, say)."""
    try:
        return _parse_import(raw)
    except InvalidInput as error:
        fields = {redact(field): redact(message) for field, message in error.field_errors.items()}
        raise InvalidInput(redact(str(error)), fields) from None


def _parse_import(raw: bytes | str) -> ImportDocument:
    document = _loads(raw)
    if not isinstance(document, dict):
        raise _refuse(f"the top level must be a JSON object, not {type(document).__name__}")
    if document.get("format") != FORMAT_NAME:
        raise _refuse(f"this is not an Imagegate settings export (format must be {FORMAT_NAME!r})", "format")
    if document.get("format_version") != FORMAT_VERSION:
        raise _refuse(
            f"format_version {document.get('format_version')!r} is not supported (this version reads {FORMAT_VERSION})",
            "format_version",
        )
    try:
        shape = ExportDocument.model_validate(document)
    except ValidationError as error:
        shape_errors = field_errors_from_validation(error, allowed=tuple(ExportDocument.model_fields))
        raise InvalidInput(f"cannot import this file: {'; '.join(shape_errors.values())}", shape_errors) from None

    errors: dict[str, str] = {}
    global_settings: GlobalSettings | None = None
    if shape.global_settings is not None:
        try:
            global_settings = validate_global_settings(shape.global_settings)
        except InvalidInput as error:
            errors.update(_prefixed(error, "global_settings."))

    providers: dict[str, ProviderSettings] = {}
    for provider, data in shape.providers.items():
        if provider not in PROVIDERS:
            errors[f"providers.{provider}"] = f"unknown provider {provider!r}; known providers: {', '.join(PROVIDERS)}"
            continue
        try:
            providers[provider] = settings_service.validate_settings(provider, data)
        except InvalidInput as error:
            errors.update(_prefixed(error, f"providers.{provider}."))
    defaults = [p for p, s in providers.items() if s.is_default]
    if len(defaults) > 1:
        errors["providers"] = f"only one provider can be the default; the file makes {', '.join(defaults)} default"

    prices: dict[str, ProviderPrice] = {}
    for provider, data in shape.prices.items():
        if provider not in PROVIDERS:
            errors[f"prices.{provider}"] = f"unknown provider {provider!r}; known providers: {', '.join(PROVIDERS)}"
            continue
        try:
            price = parse_price(data)
        except InvalidInput as error:
            errors.update(_prefixed(error, f"prices.{provider}."))
            continue
        if price.provider != provider:
            errors[f"prices.{provider}.provider"] = f"the price under {provider!r} is for {price.provider!r}"
            continue
        prices[provider] = price

    if errors:
        shown = dict(list(errors.items())[:MAX_ERRORS_SHOWN])
        more = f" (and {len(errors) - len(shown)} more)" if len(errors) > len(shown) else ""
        raise InvalidInput(f"cannot import this file: {len(errors)} problem(s){more}", shown)
    return ImportDocument(global_settings=global_settings, providers=providers, prices=prices)


# --- plan and apply --------------------------------------------------------------------------------------------


def _plan(session: Session, doc: ImportDocument) -> ImportPlan:
    items: list[PlanItem] = []
    if doc.global_settings is not None:
        current = settings_service.get_global_settings(session)
        before = settings_service.settings_json(current.settings) if current.version else None
        changes = diff_settings(before, settings_service.settings_json(doc.global_settings))
        action: Literal["create", "update", "unchanged"] = (
            "create" if before is None else ("update" if changes else "unchanged")
        )
        items.append(PlanItem("global_settings", "global", action, tuple(changes)))

    current_default = settings_service.default_provider(session)
    new_default = next((p for p, s in doc.providers.items() if s.is_default), None)
    for provider, settings in sorted(doc.providers.items()):
        try:
            current_settings = settings_service.get_provider_settings(session, provider).settings
            existing: dict[str, Any] | None = settings_service.settings_json(current_settings)
        except NotFound:
            existing = None
        changes = diff_settings(existing, settings_service.settings_json(settings))
        action = "create" if existing is None else ("update" if changes else "unchanged")
        items.append(PlanItem("provider_settings", provider, action, tuple(changes)))
    if new_default is not None and current_default not in (None, new_default) and current_default not in doc.providers:
        items.append(
            PlanItem(
                "provider_settings",
                current_default,
                "update",
                (FieldChange("is_default", True, False),),
                note=f"{new_default} becomes the default provider",
            )
        )

    for provider, price in sorted(doc.prices.items()):
        latest = price_store.latest_price_version(session, provider)
        before_price = price_store.price_json(latest.price) if latest is not None else None
        changes = diff_settings(before_price, price_store.price_json(price))
        action = "create" if latest is None else ("update" if changes else "unchanged")
        items.append(PlanItem("price", provider, action, tuple(changes)))
    return ImportPlan(tuple(items))


def plan_import(session: Session, actor: Actor, raw: bytes | str) -> ImportPlan:
    """The dry run: what applying `raw` would change, per provider and field. Writes nothing."""
    authorize(session, actor, *SETTINGS_EDITORS, action="import settings", lock=False)
    return _plan(session, parse_import(raw))


def apply_import(session: Session, actor: Actor, raw: bytes | str, *, comment: str | None = None) -> ImportPlan:
    """Apply an import as new versions with audit rows, in the caller's transaction (use db.engine.transaction:
    any failure rolls the whole import back). Everything is validated before the first write."""
    authorize(session, actor, *SETTINGS_EDITORS, action="import settings")
    doc = parse_import(raw)
    plan = _plan(session, doc)
    note = comment or "imported from a settings file"
    if doc.global_settings is not None:
        settings_service.save_global_settings(session, actor, doc.global_settings, comment=note)
    # The new default last, so the defaults it clears are already in their final state.
    for provider, settings in sorted(doc.providers.items(), key=lambda item: (item[1].is_default, item[0])):
        settings_service.save_provider_settings(session, actor, provider, settings, comment=note)
    for price in doc.prices.values():
        price_store.add_price_version(session, actor, price, comment=note)
    return plan


def import_summary(plan: ImportPlan) -> Mapping[str, int]:
    """Counts for a confirmation message: how many items would be created, updated, left unchanged."""
    counts = {"create": 0, "update": 0, "unchanged": 0}
    for item in plan.items:
        counts[item.action] += 1
    return counts
