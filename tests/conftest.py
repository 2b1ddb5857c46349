"""Process-wide test set-up: no telemetry, no network to real providers, a throwaway data directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

# Before any provider library is imported by a test module.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["DO_NOT_TRACK"] = "1"
for _key in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "IDEOGRAM_API_KEY", "HF_TOKEN"):
    os.environ.pop(_key, None)
os.environ.setdefault("IMAGEGATE_DATA_DIR", tempfile.mkdtemp(prefix="imagegate-test-data-"))

# In-process CLI runs (`imagegate generate --emulator URL` under CliRunner) set IMAGEGATE_EMULATOR_URL for the
# process, as a CLI run should; here that would outlive the test and point later tests at an emulator that has
# stopped. Every test starts and ends with the environment's provider wiring as it was.
_WIRING = ("IMAGEGATE_EMULATOR_URL", "DATABASE_URL", "IMAGEGATE_API_RATE_LIMIT", "IMAGEGATE_WEBHOOK_ALLOW_PRIVATE")


@pytest.fixture(autouse=True)
def _restore_provider_wiring() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in _WIRING}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
