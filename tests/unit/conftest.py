"""Unit tests: pure rules, no database, no application, milliseconds each.

The suite's database fixtures (``app``, ``client``, ``session``, ...) all rest on
``database_url``; a unit test that asks for one of them belongs one level up, in tests/.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_database(request: pytest.FixtureRequest) -> None:
    if "database_url" in request.fixturenames:
        pytest.fail("a unit test must not use the database fixtures; move it to tests/")
