"""Test email (SPEC 6): validation, building a well-formed message, queueing it."""
