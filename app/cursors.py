"""The envelope of the listings' opaque cursors: base64url (unpadded) of a small JSON array.

A cursor comes back from the client, so it is hostile input like any other parameter. This
module only unwraps it; each listing then checks that the value has exactly the shape it wrote
(``app/queue/reading.py``, ``app/logs/service.py``). Anything else is ``ValueError``, which the
listings answer with a 400 naming ``cursor``, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

# A real cursor is well under 200 characters; the query schemas refuse longer ones anyway.
# The bound also keeps any JSON that fits far too shallow to exhaust the parser's recursion.
MAX_CURSOR_LENGTH = 512
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def encode_cursor_payload(value: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def decode_cursor_payload(cursor: str) -> Any:
    """The JSON value inside ``cursor``; ``ValueError`` when it is not base64url of JSON."""
    if len(cursor) > MAX_CURSOR_LENGTH or not _BASE64URL.fullmatch(cursor):
        raise ValueError("not base64url")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except binascii.Error:
        raise ValueError("not base64url") from None
    return json.loads(raw.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError: ValueError
