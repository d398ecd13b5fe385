"""Migration 0005 (webhooks): the migrated schema is the models' schema, and it goes down and
up again cleanly, on SQLite and PostgreSQL."""

from __future__ import annotations

from tests.conftest import assert_migration_round_trip

TABLES = {"webhooks", "webhook_deliveries", "webhook_attempts"}


def test_0005_matches_the_models_and_goes_down_and_up(empty_url):
    assert_migration_round_trip(empty_url, TABLES, down_to="0003")
