"""Process-wide test set-up: no telemetry, no network to real providers, a throwaway data directory."""

from __future__ import annotations

import os
import tempfile

# Before any provider library is imported by a test module.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["DO_NOT_TRACK"] = "1"
for _key in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "IDEOGRAM_API_KEY", "HF_TOKEN"):
    os.environ.pop(_key, None)
os.environ.setdefault("IMAGEGATE_DATA_DIR", tempfile.mkdtemp(prefix="imagegate-test-data-"))
