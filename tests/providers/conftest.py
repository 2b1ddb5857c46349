"""Shared fixtures for provider contract tests: the whole emulator server on a free loopback port.

The server is started once per test session (Gradio's import dominates its start-up) with its own FaultBoard,
reset before every test so a fault or knob set by one test never leaks into the next. The process-wide
`emulator.faults.BOARD` is reset too, for tests that build their own emulator apps on it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.applications import Starlette

from emulator.faults import BOARD, FaultBoard
from emulator.runner import BackgroundServer, serve_in_thread
from emulator.server import create_emulator_app


@pytest.fixture(scope="session")
def emulator_board() -> FaultBoard:
    return FaultBoard()


@pytest.fixture(scope="session")
def shared_emulator_app(emulator_board: FaultBoard) -> Starlette:
    return create_emulator_app(emulator_board)


@pytest.fixture(scope="session")
def emulator_server(shared_emulator_app: Starlette) -> Iterator[BackgroundServer]:
    """The composed emulator (`/fal`, `/ideogram`, `/hf`, `/qwen/`, `/_emulator`) at `emulator_server.url`."""
    with serve_in_thread(shared_emulator_app) as server:
        yield server


@pytest.fixture(autouse=True)
def reset_fault_boards(emulator_board: FaultBoard) -> Iterator[None]:
    emulator_board.reset()
    BOARD.reset()
    yield
    emulator_board.reset()
    BOARD.reset()
