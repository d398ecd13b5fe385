"""API key request and response schemas (API.md §8)."""

from __future__ import annotations

import marshmallow as ma

from ..schemas import Timestamp
from .keys import MAX_EXPIRES_DAYS, NAME_PATTERN, NAME_RULE, ROLES


class KeyCreateSchema(ma.Schema):
    """``POST /api/auth/keys`` body."""

    name = ma.fields.String(required=True,
                            validate=ma.validate.Regexp(NAME_PATTERN, error=NAME_RULE),
                            metadata={"description": NAME_RULE})
    role = ma.fields.String(required=True, validate=ma.validate.OneOf(ROLES))
    expires_days = ma.fields.Integer(
        load_default=None, allow_none=True, strict=True,
        validate=ma.validate.Range(min=1, max=MAX_EXPIRES_DAYS),
        metadata={"description": "Days until the key expires; null or absent: never"})


class KeySchema(ma.Schema):
    """A key as listed: never the key itself, only its display prefix."""

    id = ma.fields.Integer(required=True)
    name = ma.fields.String(required=True)
    role = ma.fields.String(required=True, metadata={"enum": list(ROLES)})
    prefix = ma.fields.String(required=True,
                              metadata={"description": "The first characters of the key"})
    created_at = Timestamp(required=True)
    expires_at = Timestamp(required=True, allow_none=True)
    last_used_at = Timestamp(required=True, allow_none=True)
    revoked = ma.fields.Boolean(required=True)


class CreatedKeySchema(KeySchema):
    """A new key: the only response that ever contains the key itself."""

    key = ma.fields.String(required=True,
                           metadata={"description": "The API key; shown once, store it now"})


class CallerSchema(ma.Schema):
    """``GET /api/auth/me``: who the caller is (null name and role without a key)."""

    name = ma.fields.String(required=True, allow_none=True,
                            metadata={"description": "The key's name; null without a key"})
    role = ma.fields.String(required=True, allow_none=True,
                            metadata={"enum": [*ROLES, None],
                                      "description": "The key's role; null without a key"})
    expires_at = Timestamp(required=True, allow_none=True)
    auth_mode = ma.fields.String(required=True, metadata={
        "enum": ["admin", "all", "off"],
        "description": "ELEMTA_AUTH_MODE: admin (reads open), all (every read needs a key), "
                       "off (nothing checked)"})
