"""The emulator stands apart from the product: nothing under emulator/ imports core, db or common.

If it did, a wrong fact in the product's catalog would be mirrored by the emulator and no contract test could
catch it (tests/emulator/test_contract.py compares the two). The emulator keeps its own statement of each
provider's API in emulator/api_facts.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from common.config import PROJECT_ROOT

EMULATOR = PROJECT_ROOT / "emulator"
PRODUCT_PACKAGES = frozenset({"core", "db", "common", "cli", "ui", "pages", "views", "app"})


def product_imports(source: str, filename: str = "<source>") -> list[str]:
    """Every `import X` / `from X import ...` (at any depth, lazy imports included) of a product package."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{filename}:{node.lineno}: {name}" for name in names if name.split(".")[0] in PRODUCT_PACKAGES]
    return found


def _emulator_modules() -> list[Path]:
    return sorted(EMULATOR.rglob("*.py"))


def test_the_emulator_has_modules_to_scan() -> None:
    names = {path.name for path in _emulator_modules()}
    assert {"fal.py", "ideogram.py", "hf.py", "qwen_space.py", "api_facts.py", "server.py"} <= names


@pytest.mark.parametrize("path", _emulator_modules(), ids=lambda p: str(p.relative_to(EMULATOR)))
def test_no_emulator_module_imports_the_product(path: Path) -> None:
    assert product_imports(path.read_text(), str(path.relative_to(PROJECT_ROOT))) == []


@pytest.mark.parametrize(
    "source",
    [
        "from core.catalog import SEED_MAX",
        "import core.catalog",
        "import db",
        "def f():\n    from common.config import data_dir\n",
        "import json, core",
    ],
)
def test_the_scan_finds_every_form_of_product_import(source: str) -> None:
    assert product_imports(source) != []


def test_the_scan_leaves_the_emulators_own_imports_alone() -> None:
    assert product_imports("from emulator.api_facts import FAL_STEPS\nfrom . import faults\nimport starlette") == []
