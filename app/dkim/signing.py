"""Signing at acceptance: ``sign_outgoing`` is the one function every acceptance path calls.

Mail from trusted clients (the relay networks, SMTP AUTH, ``POST /api/send-test``) and our own
bounces is signed once, before it is stored, when the domain of its ``From:`` or a parent
domain has active keys: the signature is part of the stored content, so every retry sends the
same bytes. The most specific domain with keys signs (``d=``), with each of its active keys:
RSA and Ed25519 side by side when it has both (RFC 8463 section 5).

Signature practice (RFC 6376 section 5.4): relaxed/relaxed canonicalisation; the header fields
RFC 6376 recommends that the message has, and ``From`` once more than it occurs (over-signed),
so nobody can add a second From: after us; never ``l=`` (a body length invites appended
content); ``Received:`` and other trace fields are not signed, they change on the way.

The signatures go on top of the message, above our ``Received:``. So the DKIM-Signature fields
that open a stored message are ours (a client's own signatures come below our Received: line,
or, for mail we build, do not exist): ``signatures_of`` reads which keys signed from there.
"""

from __future__ import annotations

import email.utils
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import sqlalchemy as sa
import sqlalchemy.orm as so

from ..models import DkimKey
from ..rawselect import RawSelect
from .records import InvalidName, normalise_domain, parent_domains, parse_tags

log = logging.getLogger("elemta.dkim")

CANONICALIZATION = (b"relaxed", b"relaxed")
SIGNATURE_ALGORITHMS = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
ALGORITHM_OF_TAG = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}
OVERSIGNED_FIELDS = (b"from",)
_DKIM_SIGNATURE = b"dkim-signature"


@functools.cache
def dkimpy() -> ModuleType:
    """dkimpy, imported on first use with its RSA operation done by OpenSSL (20x faster,
    app/dkim/rsa.py). Not at import: dkimpy imports dnspython, about 50 ms of a start-up that
    the delivery worker, which signs only the bounces it writes, mostly does not need."""
    import dkim

    from . import rsa  # noqa: F401  (installs OpenSSL's RSA operation into dkimpy)

    return dkim


@functools.cache
def signed_fields() -> frozenset[bytes]:
    """The header fields we sign when present: dkimpy's recommended ones (``DKIM.SHOULD``)."""
    return frozenset(dkimpy().DKIM.SHOULD)


@dataclass(frozen=True)
class Signature:
    """Which key signed a message: ``d=``, ``s=`` and the algorithm."""

    domain: str
    selector: str
    algorithm: str

    def as_dict(self) -> dict[str, str]:
        return {"domain": self.domain, "selector": self.selector, "algorithm": self.algorithm}


def from_domain(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The domain of the message's author: one From: field whose mailboxes share one domain."""
    values = [value for name, value in headers if name.lower() == b"from"]
    if len(values) != 1:
        return None  # none, or two From: fields (RFC 5322 allows one): nothing to align with
    text = " ".join(values[0].decode("utf-8", "replace").split())
    domains = {address.rpartition("@")[2] for _name, address in email.utils.getaddresses([text])
               if "@" in address}
    if len(domains) != 1:
        return None
    try:
        return normalise_domain(domains.pop())
    except InvalidName:
        return None


_MEMO = "dkim_signing_keys"
# Every active key, read once per transaction: Core columns on the session's connection (no
# ORM compile state, no autoflush).
_ACTIVE_KEYS = sa.select(DkimKey.__table__.c.domain, DkimKey.__table__.c.selector,
                         DkimKey.__table__.c.algorithm, DkimKey.__table__.c.private_key).where(
    DkimKey.__table__.c.state == "active")
# On PostgreSQL on the raw psycopg cursor of the transaction (app/rawselect.py): the
# listener's group commit reads the keys once per batch.
_ACTIVE_KEYS_READ = RawSelect(_ACTIVE_KEYS)
ACTIVE_KEYS = _ACTIVE_KEYS  # for a caller that reads them with its own (remember_active_keys)

KeyRow = tuple[str, str, str, str]


def active_keys(session: so.Session) -> dict[str, list[KeyRow]]:
    """The active keys by domain, ``(domain, selector, algorithm, private key)`` each, rsa
    first. Read once per transaction: the listener's group commit signs up to 64 messages in
    one transaction, and with no key at all (``{}``) ``sign_outgoing`` does not even parse
    the From: field. The memo ends with the transaction (``_forget_keys``), so a key activated
    or retired applies from the next one. On the session's connection, so without autoflush:
    the messages added earlier in the transaction cannot change which keys sign, and a flush
    per message would undo the group commit's one flush per batch."""
    memo: dict[str, list[KeyRow]] | None = session.info.get(_MEMO)
    if memo is None:
        memo = remember_active_keys(session, _ACTIVE_KEYS_READ.rows(session.connection()))
    return memo


def remember_active_keys(session: so.Session, rows: Sequence[Sequence[str]]
                         ) -> dict[str, list[KeyRow]]:
    """Take ``rows``, ``(domain, selector, algorithm, private key)`` of every active key read
    by the caller in this transaction (``ACTIVE_KEYS``'s rows), as ``active_keys`` would have
    read them: the listener's group commit reads them with the batch's rules in one
    statement. Kept for the transaction, as ``active_keys`` keeps its own read."""
    memo: dict[str, list[KeyRow]] = {}
    for row in rows:
        domain, selector, algorithm, private_key = row
        memo.setdefault(domain, []).append((domain, selector, algorithm, private_key))
    for keys in memo.values():
        keys.sort(key=lambda row: row[2], reverse=True)  # rsa first, then ed25519
    session.info[_MEMO] = memo
    return memo


def signing_keys(session: so.Session, domain: str) -> list[KeyRow]:
    """``(domain, selector, algorithm, private key)`` of the active keys that sign for
    ``domain``: those of the most specific of it and its parents that has any."""
    keys = active_keys(session)
    if keys:
        for candidate in parent_domains(domain):  # the most specific first
            if candidate in keys:
                return list(keys[candidate])
    return []


@sa.event.listens_for(so.Session, "after_transaction_end")
def _forget_keys(session: so.Session, transaction: so.SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction, not a savepoint
        session.info.pop(_MEMO, None)


def header_fields(raw: bytes) -> list[tuple[bytes, bytes]] | None:
    """The header fields of a stored (CRLF) message, or None when a line is not a field.
    Only the header section is split: a 7 MB body costs nothing here."""
    end = raw.find(b"\r\n\r\n")
    dkim = dkimpy()
    try:
        headers, _body = dkim.rfc822_parse(raw if end < 0 else raw[:end + 2])
    except dkim.MessageFormatError:
        return None
    return [(name, value) for name, value in headers]


def sign_outgoing(session: so.Session, raw: bytes) -> bytes:
    """``raw`` with our DKIM-Signature fields on top, or unchanged when no key signs for its
    From: domain. A message whose header section cannot be parsed, or a signing failure (a
    damaged key), is logged and goes unsigned: mail is never refused or lost over DKIM."""
    if not active_keys(session):
        return raw  # no key signs anything: no need to find the From: domain
    headers = header_fields(raw)
    domain = from_domain(headers) if headers is not None else None
    if domain is None:
        return raw
    keys = signing_keys(session, domain)
    if not keys:
        return raw
    dkim = dkimpy()
    try:
        message = dkim.DKIM(raw, linesep=b"\r\n")
    except dkim.DKIMException as exc:
        log.warning("Not DKIM-signing a message from %s: %s", domain, exc)
        return raw
    signed = signed_fields()
    present = [name for name, _value in message.headers if name.lower() in signed]
    include = present + [name for name in present if name.lower() in OVERSIGNED_FIELDS]
    fields = []
    for key_domain, selector, algorithm, private_key in keys:
        try:
            fields.append(message.sign(
                selector.encode("ascii"), key_domain.encode("ascii"),
                private_key.encode("ascii"), signature_algorithm=SIGNATURE_ALGORITHMS[algorithm],
                canonicalize=CANONICALIZATION, include_headers=include, length=False))
        except Exception as exc:  # dkimpy's KeyFormatError, ParameterError, ...
            log.error("DKIM signing with %s._domainkey.%s (%s) failed: %s: %s; the message is "
                      "queued without this signature", selector, key_domain, algorithm,
                      type(exc).__name__, exc)
    # The last signature added ends up on top; verifiers try each.
    return b"".join(reversed(fields)) + raw


def signatures_of(raw: bytes) -> list[Signature]:
    """The signatures we added: the DKIM-Signature fields that open the stored message."""
    found = []
    for name, value in _leading_fields(raw):
        if name.lower() != _DKIM_SIGNATURE:
            break
        tags = parse_tags(value.decode("ascii", "replace"))
        found.append(Signature(tags.get("d", ""), tags.get("s", ""),
                               ALGORITHM_OF_TAG.get(tags.get("a", ""), tags.get("a", ""))))
    return found


def _leading_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Header fields from the top while they are DKIM-Signature (and the first other one)."""
    fields: list[tuple[bytes, bytes]] = []
    for line in raw.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + b" " + line.strip())
            continue
        if not line or b":" not in line:
            break
        if fields and fields[-1][0].lower() != _DKIM_SIGNATURE:
            break
        name, _, value = line.partition(b":")
        fields.append((name.strip(), value.strip()))
    return fields
