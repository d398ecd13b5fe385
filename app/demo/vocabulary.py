"""What every demo generator draws from: names, subjects, SMTP errors, the mix of states."""

from __future__ import annotations

import random
import secrets

from ..queue.states import QueueState

DOMAINS = ["example.com", "example.net", "example.org", "mail.example", "corp.example",
           "shop.example", "news.example", "partners.example"]
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
         "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter"]
SUBJECTS = ["Your invoice {n}", "Weekly report #{n}", "Password reset request",
            "Order {n} has shipped", "Meeting notes", "Welcome to the team",
            "Re: project timeline", "Newsletter: November edition", "Ticket {n} updated"]
TEMP_ERRORS = [
    (451, "4.7.1", "451 4.7.1 Greylisted, please try again later"),
    (421, "4.4.2", "421 4.4.2 Connection timed out"),
    (452, "4.2.2", "452 4.2.2 Mailbox full"),
    (None, None, "Connection refused by mx.{domain}"),
]
PERM_ERRORS = [
    (550, "5.1.1", "550 5.1.1 User unknown"),
    (554, "5.7.1", "554 5.7.1 Message rejected as spam"),
    (553, "5.1.3", "553 5.1.3 Bad destination mailbox address syntax"),
]
STATE_WEIGHTS = {QueueState.PENDING: 20, QueueState.DEFERRED: 50, QueueState.HELD: 10,
                 QueueState.FAILED: 20}


def run_tag(seed: int | None) -> str:
    """Six characters distinguishing this run's message ids from another run's."""
    if seed is None:
        return secrets.token_hex(3)
    return f"{random.Random(seed).getrandbits(24):06x}"
