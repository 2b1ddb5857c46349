"""Database fixtures (both backends) for the db tests; other folders import them the same way."""

from tests.dbfixtures import *  # noqa: F403
