"""Database fixtures (both backends) for the generation service's tests."""

from tests.dbfixtures import *  # noqa: F403
