"""Who is calling: API keys, roles, and the actor name recorded on operator actions."""

from __future__ import annotations

from flask import g


def current_actor() -> str:
    """The name recorded on operator actions: the API key's name, or ``anonymous``."""
    return g.get("actor") or "anonymous"
