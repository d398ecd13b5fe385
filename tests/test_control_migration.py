"""Migration 0006 (delivery control): the migrated schema is the models' schema, and it goes
down to 0005 and up again cleanly, on SQLite and PostgreSQL."""

from __future__ import annotations

from tests.conftest import assert_migration_round_trip

TABLES = {"delivery_policies", "connection_slots", "rate_counters", "destination_backoff",
          "suppressions", "rules"}


def test_0006_matches_the_models_and_goes_down_and_up(empty_url):
    # The revision below (0005, webhooks) is left as it was.
    assert_migration_round_trip(empty_url, TABLES, down_to="0005", left_alone={"webhooks"})
