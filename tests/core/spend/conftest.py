"""Database fixtures (both backends) for the spend tests."""

from tests.dbfixtures import *  # noqa: F403
