"""Request and response schemas of ``/api/policies``, ``/api/suppressions``, ``/api/rules``
(API.md §16.1-16.4)."""

from __future__ import annotations

import marshmallow as ma

from ..models import POLICY_KINDS, RULE_ACTIONS, Rule
from ..schemas import Limit, Timestamp
from ..timeutil import utcnow
from .policies import MAX_LIMIT
from .suppression import SOURCES


def _limit(description: str) -> ma.fields.Integer:
    """An optional limit: a whole number from 1 to MAX_LIMIT, or null for none."""
    return ma.fields.Integer(allow_none=True, strict=True,
                             validate=ma.validate.Range(min=1, max=MAX_LIMIT),
                             metadata={"description": description})


class PolicyLimitsSchema(ma.Schema):
    max_connections = _limit(
        "Connections open at once, across every worker and host")
    messages_per_connection = _limit(
        "Messages sent over one connection before it is closed")
    messages_per_minute = _limit(
        "Messages per clock minute, across every worker and host")
    messages_per_hour = _limit(
        "Messages per clock hour, across every worker and host")
    require_tls = ma.fields.Boolean(metadata={
        "description": "Deliver only over STARTTLS (else: a temporary failure)"})


class PolicyCreateSchema(PolicyLimitsSchema):
    """``POST /api/policies``: null or absent limits are not limited."""

    kind = ma.fields.String(required=True, validate=ma.validate.OneOf(POLICY_KINDS), metadata={
        "description": "domain: a recipient domain; mx: an MX host name pattern; default: "
                       "every destination without a more specific policy"})
    pattern = ma.fields.String(load_default=None, allow_none=True,
                               validate=ma.validate.Length(max=253), metadata={
                                   "description": "example.com, *.example.com (domain), "
                                                  "*.google.com (mx); none for default",
                                   "example": "example.com"})


class PolicyUpdateSchema(PolicyLimitsSchema):
    """``PATCH /api/policies/{id}``: the fields given change; null removes a limit."""


class PolicySchema(PolicyLimitsSchema):
    id = ma.fields.Integer(required=True)
    kind = ma.fields.String(required=True, metadata={"enum": list(POLICY_KINDS)})
    pattern = ma.fields.String(required=True)
    created_at = Timestamp(required=True)
    updated_at = Timestamp(required=True)


class DestinationStateSchema(ma.Schema):
    destination = ma.fields.String(required=True, metadata={
        "description": "The limit key: dest:DOMAIN, domain:*.PATTERN or mx:PATTERN"})
    backoff_level = ma.fields.Integer(required=True, metadata={
        "description": "0: as the policy says; n: connections and rates halved n times"})
    paused_until = Timestamp(required=True, allow_none=True)
    last_throttled_at = Timestamp(required=True, allow_none=True)
    last_reply = ma.fields.String(required=True, allow_none=True)
    throttles = ma.fields.Integer(required=True)
    connections = ma.fields.Integer(required=True, metadata={
        "description": "Connection slots in use (policies with a shared limit)"})
    sent_this_minute = ma.fields.Integer(required=True)
    sent_this_hour = ma.fields.Integer(required=True)


class PolicyStateSchema(ma.Schema):
    destinations = ma.fields.List(ma.fields.Nested(DestinationStateSchema), required=True)


class SuppressionQuerySchema(ma.Schema):
    address = ma.fields.String(validate=ma.validate.Length(max=320), metadata={
        "description": "Case-insensitive substring of the address"})
    source = ma.fields.String(validate=ma.validate.OneOf(SOURCES))
    reason = ma.fields.String(validate=ma.validate.Length(max=200), metadata={
        "description": "Case-insensitive substring of the reason"})
    include_expired = ma.fields.Boolean(load_default=False)


class SuppressionListQuerySchema(SuppressionQuerySchema):
    limit = Limit()
    cursor = ma.fields.String(validate=ma.validate.Length(max=512))


class SuppressionCreateSchema(ma.Schema):
    address = ma.fields.String(required=True, validate=ma.validate.Length(min=1, max=320))
    reason = ma.fields.String(load_default="", validate=ma.validate.Length(max=1000))
    expires_at = Timestamp(load_default=None, allow_none=True)


class SuppressionSchema(ma.Schema):
    id = ma.fields.Integer(required=True)
    address = ma.fields.String(required=True)
    reason = ma.fields.String(required=True)
    source = ma.fields.String(required=True, metadata={"enum": list(SOURCES)})
    enhanced_code = ma.fields.String(required=True, allow_none=True)
    message_id = ma.fields.String(required=True, allow_none=True)
    created_by = ma.fields.String(required=True)
    created_at = Timestamp(required=True)
    expires_at = Timestamp(required=True, allow_none=True)


class ImportResultSchema(ma.Schema):
    imported = ma.fields.Integer(required=True)
    skipped = ma.fields.Integer(required=True, metadata={
        "description": "Addresses that were suppressed already (left as they were)"})


class RuleCreateSchema(ma.Schema):
    action = ma.fields.String(required=True, validate=ma.validate.OneOf(RULE_ACTIONS))
    sender = ma.fields.String(load_default=None, allow_none=True,
                              validate=ma.validate.Length(max=320))
    recipient = ma.fields.String(load_default=None, allow_none=True,
                                 validate=ma.validate.Length(max=320))
    domain = ma.fields.String(load_default=None, allow_none=True,
                              validate=ma.validate.Length(max=253))
    expires_at = Timestamp(load_default=None, allow_none=True,
                           metadata={"description": "When the rule ends (or give minutes)"})
    minutes = ma.fields.Integer(load_default=None, allow_none=True, strict=True,
                                validate=ma.validate.Range(min=1, max=525600),
                                metadata={"description": "Duration, instead of expires_at"})
    comment = ma.fields.String(load_default="", validate=ma.validate.Length(max=500))

    @ma.validates_schema
    def _one_expiry(self, data: dict, **_kwargs: object) -> None:
        if (data.get("expires_at") is None) == (data.get("minutes") is None):
            raise ma.ValidationError("Give expires_at or minutes (one of them).", "expires_at")


class RuleQuerySchema(ma.Schema):
    include_expired = ma.fields.Boolean(load_default=True)


class RuleSchema(ma.Schema):
    id = ma.fields.Integer(required=True)
    action = ma.fields.String(required=True, metadata={"enum": list(RULE_ACTIONS)})
    sender = ma.fields.String(required=True, allow_none=True)
    recipient = ma.fields.String(required=True, allow_none=True)
    domain = ma.fields.String(required=True, allow_none=True)
    comment = ma.fields.String(required=True)
    created_by = ma.fields.String(required=True)
    created_at = Timestamp(required=True)
    expires_at = Timestamp(required=True)
    active = ma.fields.Method("_active", required=True, metadata={
        "type": "boolean", "description": "Not expired yet"})
    queued_matches = ma.fields.Integer(required=True, metadata={
        "description": "Queued messages it changed when it was made"})
    hits = ma.fields.Integer(required=True, metadata={
        "description": "New messages it caught since"})

    def _active(self, rule: Rule) -> bool:
        return bool(rule.expires_at > utcnow())
