"""Test email (API.md §6): validation, building a well-formed message, queueing it."""
