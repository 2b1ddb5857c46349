"""Where Imagegate keeps its files and which database it talks to.

Everything is read from the environment at call time (not import time) so tests and the CLI can point a
process at another data directory or database without reloading modules.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The data directory: `IMAGEGATE_DATA_DIR`, else `data/` beside the project. Created on first use."""
    raw = os.environ.get("IMAGEGATE_DATA_DIR")
    path = Path(raw).expanduser() if raw else PROJECT_ROOT / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def images_dir() -> Path:
    path = data_dir() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    """`DATABASE_URL` if set, else an SQLite file in the data directory."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        # Accept the common "postgresql://" spelling and use psycopg 3, the driver we ship.
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        elif url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url[len("postgres://") :]
        return url
    return f"sqlite:///{data_dir() / 'imagegate.db'}"


def disable_telemetry() -> None:
    """No provider library may phone home from this product (tests, default runs, console)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
