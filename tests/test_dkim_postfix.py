"""A signed message relayed through a real Postfix keeps a valid signature (issue 14).

Elemta's worker delivers to a private Postfix on loopback, which relays to a sink; the message
the sink receives (with Postfix's own Received: on top) still verifies.
"""

from __future__ import annotations

import time

import pytest

from app.dkim.signing import signatures_of
from tests.delivery_helpers import Peer, run_worker
from tests.dkim_verifiers import dkimpy_verifies, perl_results
from tests.dns_server import LoopbackDns
from tests.postfix_helpers import PrivatePostfix
from tests.test_dkim_signing import make_key, send_over_smtp

pytestmark = pytest.mark.slow


def test_signatures_survive_a_relay_through_postfix(make_app, app):
    with LoopbackDns() as zone, Peer() as sink, PrivatePostfix(sink.port) as postfix:
        make_key(app, zone, algorithm="rsa")
        make_key(app, zone, algorithm="ed25519")
        stored = send_over_smtp(app, subject="Hello through Postfix")
        worker_app = make_app(relay_host=f"127.0.0.1:{postfix.port}", smtp_timeout=10)
        run_worker(worker_app)
        deadline = time.monotonic() + 30  # Postfix's queue manager picks it up at once
        while not sink.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.received, f"Postfix relayed nothing; its log:\n{postfix.log_text()}"
        relayed = sink.received[0].content
        assert relayed.startswith(b"Received: from ") and b"postfix.test.example" in relayed
        assert relayed.endswith(stored.split(b"\r\n\r\n", 1)[1])
        assert len(signatures_of(stored)) == 2
        assert dkimpy_verifies(relayed, zone) == [True, True]
        rsa = [s.algorithm for s in signatures_of(stored)].index("rsa")
        assert " pass" in perl_results(relayed, zone)[rsa]
