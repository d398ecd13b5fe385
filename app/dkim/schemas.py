"""``/api/dkim/keys`` request and response schemas: never the private key."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from ..schemas import Timestamp
from .keys import ALGORITHMS, STATES, dns_record
from .records import SELECTOR_RULE


class DkimKeyCreateSchema(ma.Schema):
    """``POST /api/dkim/keys`` body."""

    domain = ma.fields.String(required=True, validate=ma.validate.Length(min=1, max=253),
                              metadata={"description": "The signing domain (d=)",
                                        "example": "example.com"})
    selector = ma.fields.String(
        load_default=None, allow_none=True, validate=ma.validate.Length(min=1, max=63),
        metadata={"description": f"The selector (s=): {SELECTOR_RULE}; default "
                                 "ALGORITHM-YYYYMMDD"})
    algorithm = ma.fields.String(load_default="rsa", validate=ma.validate.OneOf(ALGORITHMS),
                                 metadata={"description": "rsa (2048 bits) or ed25519"})


class DkimKeyQuerySchema(ma.Schema):
    domain = ma.fields.String(validate=ma.validate.Length(max=253),
                              metadata={"description": "Only the keys of this domain"})


class DnsRecordSchema(ma.Schema):
    name = ma.fields.String(required=True,
                            metadata={"example": "rsa-20260128._domainkey.example.com"})
    type = ma.fields.String(required=True, metadata={"example": "TXT"})
    value = ma.fields.String(required=True, metadata={"description": "The TXT value"})
    zone_line = ma.fields.String(required=True, metadata={
        "description": "The record as a zone-file line, split into strings of 255 octets"})


class DkimKeySchema(ma.Schema):
    """A key: what it signs for, its state, and the DNS record receivers look up."""

    id = ma.fields.Integer(required=True)
    domain = ma.fields.String(required=True)
    selector = ma.fields.String(required=True)
    algorithm = ma.fields.String(required=True, metadata={"enum": list(ALGORITHMS)})
    state = ma.fields.String(required=True, metadata={
        "enum": list(STATES),
        "description": "active: signs; standby: waits for the switch; retired: never signs"})
    created_at = Timestamp(required=True)
    activated_at = Timestamp(required=True, allow_none=True)
    retired_at = Timestamp(required=True, allow_none=True)
    dns_record = ma.fields.Method("_dns_record", required=True,
                                  metadata={"type": "object", "description":
                                            "The TXT record to publish (and keep published "
                                            "while mail it signed may still be verified)"})

    def _dns_record(self, key: Any) -> dict[str, str]:
        return DnsRecordSchema().dump(dns_record(key).as_dict())


class DkimSwitchSchema(ma.Schema):
    """The key that signs from now on, and the keys it replaced (now retired)."""

    key = ma.fields.Nested(DkimKeySchema, required=True)
    retired = ma.fields.List(ma.fields.Nested(DkimKeySchema), required=True)
