"""DKIM keys: creation, listing, rotation and retirement (docs/DKIM.md).

Each (domain, selector) has one key, RSA 2048 or Ed25519. States:

- ``active``: signs every message whose From: domain is its domain or a subdomain of it. A domain
  may have one active key per algorithm: with an RSA and an Ed25519 key both are applied.
- ``standby``: created while the domain already had an active key of that algorithm. It is
  published in DNS first and starts signing when switched to (``activate_key``); the key it
  replaces is then retired.
- ``retired``: never signs again; kept so its record can stay published while mail it signed is
  still on its way, and so old messages still name it.

The private half is stored in the database (every host of a cluster signs) and never leaves
this module except towards the signer: no response, listing or log shows it.
"""

from __future__ import annotations

import base64
import logging

import nacl.signing
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
import sqlalchemy.orm as so
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..errors import Conflict, NotFound, ValidationFailed
from ..models import DkimKey
from ..timeutil import utcnow
from .records import DnsRecord, InvalidName, check_selector, key_record, normalise_domain

log = logging.getLogger("elemta.dkim")

ALGORITHMS = ("rsa", "ed25519")
STATES = ("active", "standby", "retired")
RSA_BITS = 2048
MAX_KEY_ID = 2**31 - 1


def generate_keypair(algorithm: str) -> tuple[str, str]:
    """``(private, public)`` in dkimpy's formats: RSA as PKCS#1 PEM and the base64 of the
    SubjectPublicKeyInfo (what opendkim-genkey publishes); Ed25519 as base64 of the 32-byte
    seed and of the raw public key (RFC 8463 section 4)."""
    if algorithm == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption()).decode("ascii")
        der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        return pem, base64.b64encode(der).decode("ascii")
    signing_key = nacl.signing.SigningKey.generate()
    return (base64.b64encode(bytes(signing_key)).decode("ascii"),
            base64.b64encode(bytes(signing_key.verify_key)).decode("ascii"))


def default_selector(algorithm: str) -> str:
    """``rsa-YYYYMMDD`` / ``ed25519-YYYYMMDD``: dated, so a rotation gets a new name."""
    return f"{algorithm}-{utcnow():%Y%m%d}"


def dns_record(key: DkimKey) -> DnsRecord:
    return key_record(key.selector, key.domain, key.algorithm, key.public_key)


def create_key(session: so.Session, domain: str, selector: str | None = None,
               algorithm: str = "rsa") -> DkimKey:
    """A new key for ``domain``; active unless the domain already has an active key of this
    algorithm (then ``standby``, until switched to). Commits."""
    if algorithm not in ALGORITHMS:
        raise ValidationFailed("Invalid algorithm",
                               {"algorithm": ["Must be one of: rsa, ed25519."]})
    try:
        domain = normalise_domain(domain)
    except InvalidName as exc:
        raise ValidationFailed("Invalid domain", {"domain": [str(exc)]}) from None
    try:
        selector = check_selector(selector or default_selector(algorithm))
    except InvalidName as exc:
        raise ValidationFailed("Invalid selector", {"selector": [str(exc)]}) from None
    if _find(session, domain, selector) is not None:
        raise Conflict(f"{domain} already has a key with the selector {selector}; "
                       "choose another selector")
    private, public = generate_keypair(algorithm)
    now = utcnow().replace(microsecond=0)
    replaces = active_key(session, domain, algorithm)
    key = DkimKey(domain=domain, selector=selector, algorithm=algorithm,
                  state="standby" if replaces else "active", private_key=private,
                  public_key=public, created_at=now,
                  activated_at=None if replaces else now, retired_at=None)
    session.add(key)
    try:
        session.commit()
    except sa_exc.IntegrityError:  # the same selector, or an active key, created concurrently
        session.rollback()
        raise Conflict(f"Another DKIM key of {domain} was created at the same time "
                       f"(selector {selector}); try again") from None
    log.info("DKIM key %s._domainkey.%s created (%s, %s)", selector, domain, algorithm,
             key.state)
    return key


def active_key(session: so.Session, domain: str, algorithm: str) -> DkimKey | None:
    return session.scalar(sa.select(DkimKey).where(
        DkimKey.domain == domain, DkimKey.algorithm == algorithm, DkimKey.state == "active"))


def list_keys(session: so.Session, domain: str | None = None) -> list[DkimKey]:
    """Every key (retired ones included), by domain, then oldest first."""
    query = sa.select(DkimKey).order_by(DkimKey.domain, DkimKey.id)
    if domain:
        try:
            query = query.where(DkimKey.domain == normalise_domain(domain))
        except InvalidName:
            return []
    return list(session.scalars(query))


def _find(session: so.Session, domain: str, selector: str) -> DkimKey | None:
    return session.scalar(sa.select(DkimKey).where(DkimKey.domain == domain,
                                                   DkimKey.selector == selector))


def get_key(session: so.Session, key_id: int) -> DkimKey:
    key = session.get(DkimKey, key_id) if 0 < key_id <= MAX_KEY_ID else None
    if key is None:
        raise NotFound(f"DKIM key {key_id} not found")
    return key


def find_key(session: so.Session, domain: str, selector: str) -> DkimKey:
    """The key of ``selector`` at ``domain`` (as given by an operator)."""
    try:
        key = _find(session, normalise_domain(domain), check_selector(selector))
    except InvalidName:
        key = None
    if key is None:
        raise NotFound(f"No DKIM key {selector} for {domain}")
    return key


def _key(session: so.Session, key: DkimKey | int) -> DkimKey:
    return key if isinstance(key, DkimKey) else get_key(session, key)


def activate_key(session: so.Session, key: DkimKey | int) -> tuple[DkimKey, list[DkimKey]]:
    """Switch signing to ``key``: it becomes active, and the active key of its domain and
    algorithm is retired. Returns the key and the retired keys. Publish the record before:
    receivers fail the signatures of a key they cannot find. Commits."""
    key = _key(session, key)
    if key.state == "retired":
        raise Conflict(f"DKIM key {key.selector} of {key.domain} is retired; retired keys "
                       "never sign again (create a new one)")
    if key.state == "active":
        return key, []
    now = utcnow().replace(microsecond=0)
    replaced = list(session.scalars(sa.select(DkimKey).where(
        DkimKey.domain == key.domain, DkimKey.algorithm == key.algorithm,
        DkimKey.state == "active", DkimKey.id != key.id).with_for_update()))
    for old in replaced:
        old.state, old.retired_at = "retired", now
    session.flush()  # first: at most one active key per (domain, algorithm) (a unique index)
    key.state, key.activated_at = "active", now
    session.commit()
    log.info("DKIM key %s._domainkey.%s now signs for %s (%s)%s", key.selector, key.domain,
             key.domain, key.algorithm,
             "; retired " + ", ".join(k.selector for k in replaced) if replaced else "")
    return key, replaced


def retire_key(session: so.Session, key: DkimKey | int) -> DkimKey:
    """The key never signs again (idempotent). Commits."""
    key = _key(session, key)
    if key.state != "retired":
        key.state, key.retired_at = "retired", utcnow().replace(microsecond=0)
        session.commit()
        log.info("DKIM key %s._domainkey.%s retired", key.selector, key.domain)
    return key
