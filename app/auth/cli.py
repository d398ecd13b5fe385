"""``flask apikey create|list|revoke``: the same key service as ``/api/auth/keys``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from flask.cli import AppGroup

from ..extensions import db
from ..timeutil import isoformat_z, utcnow
from . import keys
from .schemas import KeySchema

T = TypeVar("T")

apikey_cli = AppGroup("apikey", help="Create, list and revoke API keys.")


@apikey_cli.command("create")
@click.option("--name", required=True, help="A unique name; recorded as the actor of actions.")
@click.option("--role", required=True, type=click.Choice(keys.ROLES),
              help="read: GET endpoints; send: SMTP AUTH and POST /api/send-test only; "
                   "admin: everything.")
@click.option("--expires-days", type=click.IntRange(1, keys.MAX_EXPIRES_DAYS), default=None,
              help="Days until the key expires (default: never).")
def create_cmd(name: str, role: str, expires_days: int | None) -> None:
    """Create a key and print it (alone, on stdout): it is shown only this once."""
    key, plain = _run(keys.create_key, name, role, expires_days)
    click.echo(plain)
    click.echo(f"Created API key {key.name} (role {key.role}"
               f"{', expires ' + isoformat_z(key.expires_at) if key.expires_at else ''}); "
               "store it now, it cannot be shown again.", err=True)


@apikey_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(as_json: bool) -> None:
    """List keys (never the keys themselves: only their display prefix)."""
    rows = keys.list_keys(db.session())
    if as_json:
        from ..cli import emit_json

        emit_json(KeySchema(many=True).dump(rows))
        return
    now = utcnow()
    click.echo(f"{'ID':>4}  {'NAME':<24} {'ROLE':<6} {'PREFIX':<13} {'STATUS':<8} "
               f"{'EXPIRES':<21} LAST USED")
    for key in rows:
        status = "revoked" if key.revoked else "expired" if keys.is_expired(key, now) else "active"
        click.echo(f"{key.id:>4}  {key.name:<24} {key.role:<6} {key.prefix:<13} {status:<8} "
                   f"{isoformat_z(key.expires_at) or 'never':<21} "
                   f"{isoformat_z(key.last_used_at) or 'never'}")


@apikey_cli.command("revoke")
@click.argument("name")
def revoke_cmd(name: str) -> None:
    """Revoke a key by name (or id); requests with it are refused from now on."""
    key = _run(keys.revoke_key, name)
    click.echo(f"API key {key.name} revoked")


def _run(func: Callable[..., T], *args: Any) -> T:
    """Service errors become a one-line message and exit status 1."""
    from ..errors import ApiError

    try:
        return func(db.session(), *args)
    except ApiError as exc:
        detail = ""
        if isinstance(exc.details, dict):
            detail = ": " + "; ".join(f"{field}: {' '.join(map(str, messages))}"
                                      for field, messages in exc.details.items())
        raise click.ClickException(exc.message + detail) from None
