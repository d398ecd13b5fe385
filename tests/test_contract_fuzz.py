"""The OpenAPI document against the running app: schemathesis, in-process (WSGI), bounded.

Every operation of /api/openapi.json gets generated requests, valid ones and invalid ones, from
a fixed seed (hypothesis ``derandomize``), a few examples each, sent with an admin key. No
response may be a 5xx and every one must match the document: a documented status, content
type, headers and body schema (errors: the contract's ``{"error", "code", "details"}``).

The operations are driven one by one through ``as_strategy`` (schemathesis' pytest plugin does
not run under this pytest version), and every failure is collected before the test fails.
"""

from __future__ import annotations

import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.modes import GenerationMode

from app.auth.keys import MAX_KEY_ID, hash_key
from app.models import ApiKey
from app.timeutil import utcnow
from tests.helpers import queue_message

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
# The fuzzer's own admin key, with an id it will not guess: DELETE /api/auth/keys/{key_id}
# with small ids is certain to be tried, and revoking this key would end the run in 401s.
FUZZ_KEY = "elemta_fuzz-admin-key-abcdefghijklmnopqrstuvwxyz0123456789"
AUTH = {"Authorization": f"Bearer {FUZZ_KEY}"}
EXAMPLES = {GenerationMode.POSITIVE: 10, GenerationMode.NEGATIVE: 6}
# WebSocket upgrades are not plain HTTP exchanges: tests/test_stream* cover them.
SKIPPED_PATH_SUFFIXES = ("/ws",)


@pytest.fixture
def fuzz_schema(make_app, app, session):
    """The app under test (rate limits out of the way), with some mail in every state."""
    fuzzed = make_app(ratelimit_default="1000000 per minute", ratelimit_strict="1000000 per minute")
    session.execute(sa.insert(ApiKey).values(
        id=MAX_KEY_ID - 1, name="fuzz", prefix=FUZZ_KEY[:12], key_hash=hash_key(FUZZ_KEY),
        role="admin", created_at=utcnow(), revoked=False))
    session.commit()
    for state in ("pending", "deferred", "held", "failed"):
        queue_message(session, state=state)
    return schemathesis.openapi.from_wsgi("/api/openapi.json", fuzzed)


def operations(schema):
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.endswith(SKIPPED_PATH_SUFFIXES):
            yield operation


def run_operation(operation, mode: GenerationMode, statuses: list[int], **fixed) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @settings(max_examples=EXAMPLES[mode], derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    def exercise(case) -> None:
        statuses.append(case.call_and_validate(headers=AUTH, checks=CHECKS).status_code)

    exercise()


def test_openapi_contract(fuzz_schema, session):
    real_id = queue_message(session, state="deferred")
    failures = []
    statuses: list[int] = []
    seen = 0
    for operation in operations(fuzz_schema):
        runs = [(mode, {}) for mode in EXAMPLES]
        if "{message_id}" in operation.path:
            # Random ids only reach the 404; a real one reaches the view's other answers too.
            runs.append((GenerationMode.POSITIVE, {"path_parameters": {"message_id": real_id}}))
        for mode, fixed in runs:
            seen += 1
            try:
                run_operation(operation, mode, statuses, **fixed)
            except Unsatisfiable:
                # Nothing to make invalid (no parameters, no body): nothing to test that way.
                assert mode is GenerationMode.NEGATIVE
            except (Exception, BaseExceptionGroup) as exc:  # collect all, then fail once
                failures.append(f"--- {operation.method.upper()} {operation.path} ({mode}):\n{exc}")
    assert seen >= 40, "the document lists fewer operations than expected"
    # The run reached the views, not only the validation in front of them.
    assert {200, 400, 404} <= set(statuses), sorted(set(statuses))
    assert len(statuses) >= 200
    assert not failures, "\n\n".join(failures)
