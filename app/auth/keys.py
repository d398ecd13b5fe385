"""API keys (API.md §8): creation, listing, revocation and verification.

A key is ``elemta_`` followed by 32 random bytes in base64url. Only its SHA-256 (hex) and a
short display prefix are stored: the key itself is shown once, at creation, and cannot be
recovered from the database. The API, the CLI and the SMTP listener (AUTH with a key as the
password) all go through ``verify_key``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import secrets

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
import sqlalchemy.orm as so

from ..errors import Conflict, NotFound, ValidationFailed
from ..models import ApiKey
from ..timeutil import utcnow

log = logging.getLogger("elemta.auth")

KEY_PREFIX = "elemta_"
KEY_RANDOM_BYTES = 32
# "elemta_" and the first characters of the random part: enough to tell keys apart in a list.
DISPLAY_PREFIX_LENGTH = len(KEY_PREFIX) + 5
# read: GET endpoints; send: SMTP AUTH and POST /api/send-test only; admin: everything.
ROLES = ("read", "send", "admin")
SENDING_ROLES = frozenset({"send", "admin"})
MAX_KEY_ID = 2**31 - 1  # an INTEGER column: a larger id cannot exist (and must not reach SQL)
MAX_EXPIRES_DAYS = 36500
# Longest string worth hashing: a real key is 50 characters.
MAX_KEY_LENGTH = 256
# last_used_at is a hint for operators, not an audit log: write it at most this often per key,
# so that authenticating a request costs one indexed read and almost never a write.
LAST_USED_RESOLUTION = dt.timedelta(seconds=60)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
NAME_RULE = "1-100 characters: letters, digits and . _ @ - (starting with a letter or digit)"


def hash_key(plain_key: str) -> str:
    return hashlib.sha256(plain_key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def is_expired(key: ApiKey, now: dt.datetime | None = None) -> bool:
    return key.expires_at is not None and key.expires_at <= (now or utcnow())


def is_active(key: ApiKey, now: dt.datetime | None = None) -> bool:
    return not key.revoked and not is_expired(key, now)


def create_key(session: so.Session, name: str, role: str,
               expires_days: int | None = None) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plain key (its only appearance). Commits."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValidationFailed("Invalid key name", {"name": [NAME_RULE]})
    if role not in ROLES:
        raise ValidationFailed("Invalid role", {"role": ["Must be one of: read, send, admin."]})
    if expires_days is not None and not 1 <= expires_days <= MAX_EXPIRES_DAYS:
        raise ValidationFailed("Invalid expiry",
                               {"expires_days": [f"Must be between 1 and {MAX_EXPIRES_DAYS}."]})
    if session.scalar(sa.select(ApiKey.id).where(ApiKey.name == name)) is not None:
        raise Conflict(f"An API key named {name} already exists")
    plain = generate_key()
    now = utcnow().replace(microsecond=0)
    key = ApiKey(
        name=name,
        prefix=plain[:DISPLAY_PREFIX_LENGTH],
        key_hash=hash_key(plain),
        role=role,
        created_at=now,
        expires_at=now + dt.timedelta(days=expires_days) if expires_days else None,
        revoked=False,
        last_used_at=None,
    )
    session.add(key)
    try:
        session.commit()
    except sa_exc.IntegrityError:  # the same name created concurrently
        session.rollback()
        raise Conflict(f"An API key named {name} already exists") from None
    log.info("API key %s created (role %s)", name, role)
    return key, plain


def list_keys(session: so.Session) -> list[ApiKey]:
    """Every key, revoked and expired ones included, oldest first."""
    return list(session.scalars(sa.select(ApiKey).order_by(ApiKey.id)))


def find_key(session: so.Session, name_or_id: str | int) -> ApiKey:
    """A key by name, or by numeric id when no key has that name."""
    key = None
    if isinstance(name_or_id, str):
        key = session.scalar(sa.select(ApiKey).where(ApiKey.name == name_or_id))
    if key is None and str(name_or_id).isdigit() and int(name_or_id) <= MAX_KEY_ID:
        key = session.get(ApiKey, int(name_or_id))
    if key is None:
        raise NotFound(f"API key {name_or_id} not found")
    return key


def revoke_key(session: so.Session, name_or_id: str | int) -> ApiKey:
    """Revoke a key (by name or id). It stays listed, marked revoked. Idempotent; commits."""
    key = find_key(session, name_or_id)
    if not key.revoked:
        key.revoked = True
        session.commit()
        log.info("API key %s revoked", key.name)
    return key


def verify_key(session: so.Session, plain_key: str | None) -> ApiKey | None:
    """The key row when ``plain_key`` is a valid, unrevoked, unexpired key; else None.

    Updates ``last_used_at`` when it is more than a minute old (then commits; the caller should
    have nothing pending in ``session``).
    """
    if not plain_key or not isinstance(plain_key, str) or len(plain_key) > MAX_KEY_LENGTH \
            or not plain_key.startswith(KEY_PREFIX):
        return None
    key = session.scalar(sa.select(ApiKey).where(ApiKey.key_hash == hash_key(plain_key)))
    now = utcnow()
    if key is None or not is_active(key, now):
        return None
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        # A conditional update: concurrent requests of the same key write once.
        stale = now - LAST_USED_RESOLUTION
        session.execute(
            sa.update(ApiKey)
            .where(ApiKey.id == key.id,
                   sa.or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= stale))
            .values(last_used_at=now.replace(microsecond=0)),
            execution_options={"synchronize_session": False},
        )
        session.commit()
        session.refresh(key)  # usable after the caller's session ends
    return key
