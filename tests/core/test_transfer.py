"""Settings export/import: round trip, dry-run plan, atomic apply, and bad or hostile files changing nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common.errors import InvalidInput, PermissionDenied
from core import audit, price_store, settings_service, transfer
from core.security import Actor, Role
from core.seed import seed_defaults
from db.engine import transaction
from db.models import Base
from tests.dbfixtures import *  # noqa: F403

ADMIN = Actor.system("ada")  # the process itself (as the CLI acts): authorization is tested in tests/core/test_authz*
USER = Actor(user_id=None, username="ursula", role=Role.USER)


def _snapshot(factory: sessionmaker[Session]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order: equal snapshots mean an unchanged database."""
    with factory() as session:
        return {
            table.name: [tuple(row) for row in session.execute(select(table).order_by(*table.primary_key.columns))]
            for table in Base.metadata.sorted_tables
        }


def _export(factory: sessionmaker[Session]) -> dict[str, Any]:
    with factory() as session:
        doc: dict[str, Any] = json.loads(transfer.export_json(session, ADMIN))
    return doc


def _seed(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    seed_defaults(factory)
    with transaction(factory) as session:
        settings_service.save_provider_settings(session, ADMIN, "sandbox", {"is_default": True})
    return factory


@pytest.fixture
def seeded(db_session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    return _seed(db_session_factory)


@pytest.fixture
def seeded_sqlite(sqlite_session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Parsing does not depend on the backend; the all-or-nothing tests below run on both."""
    return _seed(sqlite_session_factory)


def test_export_is_a_documented_versioned_document(seeded: sessionmaker[Session]) -> None:
    doc = _export(seeded)
    assert (doc["format"], doc["format_version"]) == ("imagegate.settings", 1)
    assert set(doc) == {"format", "format_version", "exported_at", "global_settings", "providers", "prices"}
    assert set(doc["providers"]) == {"fal-qwen", "ideogram", "huggingface", "qwen", "sandbox"}
    assert doc["providers"]["sandbox"]["is_default"] is True
    assert doc["prices"]["fal-qwen"]["usd_per_unit"] == "0.02"  # exact decimal strings, never floats


def test_export_then_import_changes_nothing(seeded: sessionmaker[Session]) -> None:
    text = json.dumps(_export(seeded))
    before = _snapshot(seeded)
    with transaction(seeded) as session:
        plan = transfer.apply_import(session, ADMIN, text)
    assert not plan.has_changes and plan.summary() == "nothing would change"
    assert len(plan.items) == 1 + 5 + 5
    assert _snapshot(seeded) == before


def test_export_moves_settings_to_another_database(
    seeded: sessionmaker[Session], sqlite_session_factory: sessionmaker[Session]
) -> None:
    with transaction(seeded) as session:
        settings_service.update_provider_settings(session, ADMIN, "fal-qwen", {"params": {"seed": 42}})
    with seeded() as session:
        text = transfer.export_json(session, ADMIN)
    with transaction(sqlite_session_factory) as session:
        plan = transfer.apply_import(session, ADMIN, text.encode())
    assert {i.action for i in plan.items} == {"create"}
    assert _export(sqlite_session_factory) | {"exported_at": None} == json.loads(text) | {"exported_at": None}


def test_dry_run_shows_changes_per_provider_and_field_and_writes_nothing(seeded: sessionmaker[Session]) -> None:
    doc = _export(seeded)
    doc["providers"]["fal-qwen"]["params"] = {"num_inference_steps": 33}
    doc["providers"]["qwen"]["is_default"] = True
    doc["prices"]["ideogram"]["keyed_usd_per_unit"]["TURBO"] = "0.025"
    del doc["providers"]["sandbox"]  # left out: left alone, except that it stops being the default
    before = _snapshot(seeded)
    with seeded() as session:
        plan = transfer.plan_import(session, ADMIN, json.dumps(doc))
    assert _snapshot(seeded) == before
    changed = {(i.kind, i.target): [(c.field, c.before, c.after) for c in i.changes] for i in plan.changed}
    assert changed == {
        ("provider_settings", "fal-qwen"): [("params.num_inference_steps", None, 33)],
        ("provider_settings", "qwen"): [("is_default", False, True)],
        ("provider_settings", "sandbox"): [("is_default", True, False)],
        ("price", "ideogram"): [("keyed_usd_per_unit.TURBO", "0.03", "0.025")],
    }
    # The plan shows each changed field with its old and new value (JSON, so "0.03" the text is visibly text).
    assert plan.summary().splitlines() == [
        "update provider_settings fal-qwen",
        "  params.num_inference_steps: (not set) -> 33",
        "update provider_settings qwen",
        "  is_default: false -> true",
        "update provider_settings sandbox (qwen becomes the default provider)",
        "  is_default: true -> false",
        "update price ideogram",
        '  keyed_usd_per_unit.TURBO: "0.03" -> "0.025"',
    ]
    assert transfer.import_summary(plan) == {"create": 0, "update": 4, "unchanged": 7}

    with transaction(seeded) as session:
        transfer.apply_import(session, ADMIN, json.dumps(doc), comment="from staging")
    with seeded() as session:
        assert settings_service.default_provider(session) == "qwen"
        assert settings_service.get_provider_settings(session, "fal-qwen").settings.params == {
            "num_inference_steps": 33
        }
        turbo = price_store.latest_price_version(session, "ideogram")
        assert turbo is not None and turbo.version == 2 and str(turbo.price.keyed_usd_per_unit["TURBO"]) == "0.025"
        entries = audit.list_entries(session, ADMIN, limit=4)
    assert {(e.target_type, e.target_id) for e in entries} == {
        ("provider_settings", "fal-qwen"),
        ("provider_settings", "qwen"),
        ("provider_settings", "sandbox"),
        ("price", "ideogram"),
    }


def test_text_that_looks_like_html_is_kept_as_text(seeded: sessionmaker[Session]) -> None:
    doc = _export(seeded)
    hostile = "<script>alert('x')</script> & <b>bold</b> \"quoted\""
    doc["providers"]["fal-qwen"]["params"] = {"negative_prompt": hostile}
    with transaction(seeded) as session:
        transfer.apply_import(session, ADMIN, json.dumps(doc))
    with seeded() as session:
        assert settings_service.get_provider_settings(session, "fal-qwen").settings.params["negative_prompt"] == hostile


def _valid_doc() -> dict[str, Any]:
    return {"format": "imagegate.settings", "format_version": 1, "providers": {"sandbox": {"priority": 5}}}


def _with(**changes: Any) -> str:
    return json.dumps(_valid_doc() | changes)


def _price(amount: str) -> dict[str, str]:
    return {
        "provider": "fal-qwen",
        "unit": "megapixel",
        "usd_per_unit": amount,
        "source": "s",
        "effective_date": "2026-01-01",
    }


def _price_number(written: str) -> str:
    """A file whose price is a JSON number written exactly as `written`."""
    return _with(prices={"fal-qwen": _price("PLACEHOLDER")}).replace('"PLACEHOLDER"', written)


_DEEP = (
    '{"format": "imagegate.settings", "format_version": 1, "providers": {"sandbox": {"params": '
    + ("[" * 40 + "]" * 40)
    + "}}}"
)
_VERY_DEEP = "[" * 200_000 + "]" * 200_000

BAD_FILES: list[tuple[str, bytes | str, str]] = [
    ("empty", b"", "it is empty"),
    ("not json", b"format = imagegate", "not valid JSON"),
    ("truncated", _with()[:-5], "not valid JSON"),
    ("not utf-8", b'{"format": "\xff\xfe"}', "not UTF-8"),
    ("array at top", b"[1, 2, 3]", "top level must be a JSON object"),
    ("other format", json.dumps(_valid_doc() | {"format": "litellm"}), "not an Imagegate settings export"),
    ("future version", json.dumps(_valid_doc() | {"format_version": 2}), "format_version 2 is not supported"),
    ("extra top-level key", _with(api_keys={"fal-qwen": "x"}), "unknown setting 'api_keys'"),
    ("section of wrong type", _with(providers=["sandbox"]), "providers"),
    ("wrong field type", _with(providers={"sandbox": {"priority": "high"}}), "priority must be a whole number"),
    ("unknown provider", _with(providers={"dall-e": {}}), "unknown provider 'dall-e'"),
    ("unknown parameter", _with(providers={"sandbox": {"params": {"loras": []}}}), "unknown parameter 'loras'"),
    ("out of range", _with(providers={"sandbox": {"params": {"num_images": 99}}}), "above sandbox's maximum"),
    ("two defaults", _with(providers={"sandbox": {"is_default": True}, "qwen": {"is_default": True}}), "only one"),
    ("default inactive", _with(providers={"qwen": {"is_default": True, "active": False}}), "must be active"),
    ("bad global", _with(global_settings={"max_attempts": 0}), "max_attempts 0 is below"),
    ("bad price", _with(prices={"fal-qwen": {"provider": "fal-qwen", "unit": "megapixel"}}), "problem"),
    (
        "price under the wrong provider",
        _with(prices={"qwen": {"provider": "sandbox", "unit": "free", "source": "x", "effective_date": "2026-01-01"}}),
        "is for 'sandbox'",
    ),
    ("NaN", _with()[:-1] + ', "x": NaN}', "NaN is not a number JSON allows"),
    ("huge float", _with(providers={"sandbox": {"priority": 1}}).replace('"priority": 1', '"priority": 1e999'), "too"),
    ("huge integer", _with().replace('"priority": 5', '"priority": ' + "9" * 5000), "far too large"),
    (
        "duplicate keys",
        '{"format": "imagegate.settings", "format": "imagegate.settings", "format_version": 1}',
        "twice",
    ),
    ("nested too deep", _DEEP, "nested more than"),
    ("recursion bomb", _VERY_DEEP, "nested more than"),
    (
        "control character",
        _with(providers={"sandbox": {"params": {"negative_prompt": "blurry\u0007"}}}),
        "control character U+0007",
    ),
    ("NUL in a key", _with(providers={"sand\u0000box": {}}), "control character U+0000"),
    ("lone surrogate", '{"format": "imagegate.settings", "format_version": 1, "x": "\\ud800"}', "surrogate"),
    ("oversized", _with() + " " * (transfer.MAX_IMPORT_BYTES + 1), "the limit is 1,048,576 bytes"),
    # Money without bounds: each of these once broke a page, stored a megabyte or raised decimal.Overflow.
    ("price 1E+1000", _with(prices={"fal-qwen": _price("1E+1000")}), "uses an exponent"),
    ("price 1E+999999", _with(prices={"fal-qwen": _price("1E+999999")}), "uses an exponent"),
    ("price 1E+100000000", _with(prices={"fal-qwen": _price("1E+100000000")}), "uses an exponent"),
    ("price as an exponent number", _price_number("1e2"), "uses an exponent"),
    ("price rounded as a float", _price_number("0.12345678901234567"), "more than 6 decimal places"),
    ("price too dear", _with(prices={"fal-qwen": _price("1000001")}), "above the maximum of 1,000,000"),
    ("limit too high", _with(providers={"sandbox": {"daily_cost_limit_usd": "10000000.5"}}), "10,000,000"),
    ("timeout true", _with(global_settings={"request_timeout_s": True}), "request_timeout_s must be a number"),
    ("timeout text", _with(providers={"sandbox": {"request_timeout_s": "30"}}), "request_timeout_s must be a number"),
    (
        "token destination",
        _with(providers={"huggingface": {"params": {"model": "https://collector.example.net/"}}}),
        "IMAGEGATE_HF_ALLOWED_ENDPOINTS",
    ),
]


@pytest.mark.parametrize(("raw", "message"), [pytest.param(raw, msg, id=name) for name, raw, msg in BAD_FILES])
def test_bad_files_fail_clearly_and_change_nothing(
    seeded_sqlite: sessionmaker[Session], raw: bytes | str, message: str
) -> None:
    before = _snapshot(seeded_sqlite)
    with pytest.raises(InvalidInput) as caught, transaction(seeded_sqlite) as session:
        transfer.apply_import(session, ADMIN, raw)
    assert message in str(caught.value) + " " + " ".join(caught.value.field_errors.values())
    assert str(caught.value).startswith("cannot import this file")
    assert _snapshot(seeded_sqlite) == before


def test_a_partly_valid_file_changes_nothing(seeded: sessionmaker[Session]) -> None:
    doc = _export(seeded)
    doc["global_settings"]["num_images"] = 2  # valid
    doc["providers"]["fal-qwen"]["priority"] = 1  # valid
    doc["providers"]["ideogram"]["params"] = {"rendering_speed": "LUDICROUS"}  # not valid
    before = _snapshot(seeded)
    with pytest.raises(InvalidInput) as caught, transaction(seeded) as session:
        transfer.apply_import(session, ADMIN, json.dumps(doc))
    assert list(caught.value.field_errors) == ["providers.ideogram.params.rendering_speed"]
    assert _snapshot(seeded) == before


def test_a_failure_while_applying_rolls_everything_back(
    seeded: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = _export(seeded)
    doc["providers"]["fal-qwen"]["priority"] = 1
    doc["prices"]["fal-qwen"]["usd_per_unit"] = "0.03"
    before = _snapshot(seeded)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(price_store, "add_price_version", broken)
    with pytest.raises(OSError), transaction(seeded) as session:
        transfer.apply_import(session, ADMIN, json.dumps(doc))
    assert _snapshot(seeded) == before


def test_only_admins_and_heroes_import_or_export(seeded: sessionmaker[Session]) -> None:
    text = json.dumps(_export(seeded))
    with seeded() as session:
        for call in (
            lambda: transfer.export_json(session, USER),
            lambda: transfer.plan_import(session, USER, text),
            lambda: transfer.apply_import(session, USER, text),
        ):
            with pytest.raises(PermissionDenied):
                call()


def test_export_never_contains_an_api_key(seeded: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAL_KEY", "fal-key-0123456789abcdef")
    with seeded() as session:
        assert "fal-key-0123456789abcdef" not in transfer.export_json(session, ADMIN)
    # If a key ever ended up in a stored value, the export refuses instead of leaking it.
    with transaction(seeded) as session:
        settings_service.update_provider_settings(
            session, ADMIN, "huggingface", {"params": {"model": "org/leaky-model"}}
        )
    monkeypatch.setenv("HF_TOKEN", "org/leaky-model")
    with seeded() as session, pytest.raises(RuntimeError, match="API key"):
        transfer.export_json(session, ADMIN)


def test_a_json_number_price_is_taken_exactly_as_written(seeded: sessionmaker[Session]) -> None:
    doc = _export(seeded)
    text = json.dumps(doc).replace('"usd_per_unit": "0.02"', '"usd_per_unit": 0.025', 1)
    with transaction(seeded) as session:
        transfer.apply_import(session, ADMIN, text)
    with seeded() as session:
        latest = price_store.latest_price_version(session, "fal-qwen")
        assert latest is not None and str(latest.price.usd_per_unit) == "0.025"
        assert price_store.price_json(latest.price)["usd_per_unit"] == "0.025"


SECRET = "hf_0123456789abcdefSECRET"


@pytest.mark.parametrize(
    "where",
    ["price source", "price notes", "negative prompt", "escaped", "mapping key", "global"],
)
def test_an_import_containing_a_configured_key_is_refused_and_stores_nothing(
    seeded: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    doc = _export(seeded)
    if where == "price source":
        doc["prices"]["fal-qwen"]["source"] = f"https://fal.ai/pricing?token={SECRET}"
    elif where == "price notes":
        doc["prices"]["fal-qwen"]["notes"] = f"ask {SECRET}"
    elif where == "negative prompt":
        doc["providers"]["fal-qwen"]["params"] = {"negative_prompt": SECRET}
    elif where == "mapping key":
        doc["providers"]["fal-qwen"]["params"] = {SECRET: 1}
    elif where == "global":
        doc["global_settings"]["negative_prompt"] = SECRET
    text = json.dumps(doc)
    if where == "escaped":  # JSON escapes hide the key from a search of the raw text, not from the parsed text
        doc["prices"]["fal-qwen"]["source"] = "PLACEHOLDER"
        escaped = "".join(f"\\u{ord(c):04x}" for c in SECRET)
        text = json.dumps(doc).replace("PLACEHOLDER", escaped)
        assert SECRET not in text
    before = _snapshot(seeded)
    for attempt in (transfer.plan_import, transfer.apply_import):
        with pytest.raises(InvalidInput) as caught, transaction(seeded) as session:
            attempt(session, ADMIN, text)
        shown = str(caught.value) + json.dumps(caught.value.field_errors)
        assert "configured API key" in shown and "HF_TOKEN" in shown
        assert SECRET not in shown
    assert _snapshot(seeded) == before  # nothing in the settings, prices or the audit log


def test_a_key_that_reached_storage_another_way_is_refused_by_the_price_store(
    seeded: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    price = _export(seeded)["prices"]["fal-qwen"] | {"source": SECRET}
    with pytest.raises(InvalidInput) as caught, transaction(seeded) as session:
        price_store.add_price_version(session, ADMIN, price)
    assert "source" in caught.value.field_errors
    with pytest.raises(InvalidInput) as caught, transaction(seeded) as session:
        price_store.add_price_version(session, ADMIN, _export(seeded)["prices"]["qwen"], comment=f"k {SECRET}")
    assert "comment" in caught.value.field_errors


_REDOS_CHECK = """
import sys, time
from common.errors import InvalidInput
from core import transfer
size = transfer.MAX_IMPORT_BYTES
inputs = [
    '\\\\"' * (size // 2),                                  # backslash-quote, no opening quote
    '"' + '\\\\"' * (size // 2 - 1),                        # one unclosed string of escaped quotes
    '{"a": "' + '\\\\"' * (size // 2 - 8),                  # the same inside a document
    '"' * size,                                               # quotes only
    '[]' * (size // 2),                                       # brackets only
    '{"a": "x", ' * (size // 11),                             # many small strings
]
started = time.perf_counter()
for text in inputs:
    assert size - 16 <= len(text.encode()) <= size, len(text)
    try:
        transfer.parse_import(text)
    except InvalidInput:
        pass
print(f"{time.perf_counter() - started:.3f}")
"""


def test_a_megabyte_of_adversarial_input_is_parsed_in_linear_time() -> None:
    """1 MiB of backslash-quote took the old depth pre-scan about 50 minutes (4 s per 40,000 characters, growing
    with the square). Run in a child process so a regression fails at the timeout instead of hanging the suite;
    the bound is generous (a linear scan takes well under a second), the point is to finish at all."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _REDOS_CHECK], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 10.0
