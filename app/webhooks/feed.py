"""Which message events become which webhook events, and the JSON body each one is sent as.

Pure functions over ``delivery_events`` rows (docs/WEBHOOKS.md, "Event types"):

| webhook event | message event |
|---|---|
| queued | ``reception`` of a message with a sender |
| bounced | ``reception`` of a null-sender message (``<>``): a delivery status notification |
| delivered / deferred / failed | ``delivery`` / ``tempfail`` / ``rejection`` of a recipient |
| held / released | ``system`` events with that action |
| deleted | ``system`` events ``deleted``, ``flushed`` (bulk) or ``purged`` (retention) |
| suppressed | ``system`` events with action ``suppressed`` (the suppression list, issue 15) |

The SMTP listener's refusals (``rejection`` without a message) and ``retried`` are not
webhook events.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..timeutil import isoformat_z

OUTCOME_TYPES = {"delivery": "delivered", "tempfail": "deferred", "rejection": "failed"}
SYSTEM_ACTIONS = {"held": "held", "released": "released", "deleted": "deleted",
                  "flushed": "deleted", "purged": "deleted", "suppressed": "suppressed"}
# The bounce's reception note names the message it reports on (app/delivery/outcomes.py).
_DSN_FOR = re.compile(r"^Delivery status notification for (\S+) ")

# The event columns the feed reads (and nothing else: never the raw message).
COLUMNS = ("id", "timestamp", "event_type", "message_id", "sender", "recipient", "message",
           "delivery_ip", "delivery_host", "smtp_code", "enhanced_code", "action",
           "queue_state")


def webhook_type(event: Mapping[str, Any]) -> str | None:
    """The webhook event type of a message event, or None when it is not one."""
    kind = event["event_type"]
    if kind == "reception":
        if not event["message_id"]:
            return None
        return "bounced" if event["sender"] == "" else "queued"
    if kind in OUTCOME_TYPES:
        return OUTCOME_TYPES[kind] if event["message_id"] and event["recipient"] else None
    if kind == "system":
        return SYSTEM_ACTIONS.get(event["action"] or "")
    return None


def payload(event: Mapping[str, Any], kind: str) -> str:
    """The request body: compact JSON, the same bytes for every attempt and redelivery."""
    data: dict[str, Any] = {
        "message_id": event["message_id"],
        "sender": event["sender"],
        "recipient": event["recipient"],
        "queue_state": event["queue_state"],
        "action": event["action"],
        "text": event["message"],
        "smtp_code": event["smtp_code"],
        "enhanced_code": event["enhanced_code"],
        "remote_host": event["delivery_host"],
        "remote_ip": event["delivery_ip"],
    }
    if kind == "bounced":
        match = _DSN_FOR.match(event["message"] or "")
        data["original_message_id"] = match.group(1) if match else None
    body = {"id": event_id_text(event["id"]), "type": kind,
            "created_at": isoformat_z(event["timestamp"]), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def event_id_text(event_id: int) -> str:
    """``Elemta-Event-Id`` and the body's ``id``: stable across retries, for deduplication."""
    return f"evt_{event_id}"
