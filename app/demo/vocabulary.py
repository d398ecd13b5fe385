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
# Every demo message id starts with this (queued, history and bulk alike): `flask demo reset`
# deletes exactly these; real ids are "msg-" and 22 URL-safe characters.
DEMO_ID_PREFIX = "msg-demo-"
STATE_WEIGHTS = {QueueState.PENDING: 20, QueueState.DEFERRED: 50, QueueState.HELD: 10,
                 QueueState.FAILED: 20}


def _zipf(n: int) -> list[float]:
    return [1 / rank for rank in range(1, n + 1)]


class AddressPicker:
    """Addresses as real mail has them: a few domains and a few people send most of it.

    Domains are drawn by Zipf's law in DOMAINS order (example.com most often); within each
    domain the people are too, each domain with its own ranking (alice leads at example.com,
    bob at example.net ...). So the README's filter combinations
    (``?domain=example.com&sender=alice``) find messages, as they would on a real queue.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.domain_weights = _zipf(len(DOMAINS))
        self.user_weights = _zipf(len(USERS))

    def address(self) -> str:
        index = self.rng.choices(range(len(DOMAINS)), self.domain_weights)[0]
        people = USERS[index:] + USERS[:index]
        return f"{self.rng.choices(people, self.user_weights)[0]}@{DOMAINS[index]}"


def run_tag(seed: int | None) -> str:
    """Six characters distinguishing this run's message ids from another run's."""
    if seed is None:
        return secrets.token_hex(3)
    return f"{random.Random(seed).getrandbits(24):06x}"
