"""``flask dkim create|list|show|activate|retire``: the same key service as ``/api/dkim/keys``.

The private key is never printed: ``create`` prints the DNS record to publish, nothing else.
"""

from __future__ import annotations

from typing import Any

import click
from flask.cli import AppGroup

from ..cli import emit_json, reports_errors
from ..extensions import db
from ..models import DkimKey
from ..timeutil import isoformat_z
from . import keys
from .records import SELECTOR_RULE
from .schemas import DkimKeySchema

dkim_cli = AppGroup("dkim", help="DKIM signing keys: create, list, show, activate, retire.")


def _print_record(key: DkimKey) -> None:
    record = keys.dns_record(key)
    click.echo(f"Publish this DNS record (TXT) at {record.name}:")
    click.echo("")
    click.echo(f"  {record.value}")
    click.echo("")
    click.echo("As a zone-file line (long values are split into strings of 255 characters):")
    click.echo("")
    click.echo(f"  {record.zone_line}")


def _state_words(key: DkimKey) -> str:
    if key.state == "active":
        return f"signs mail from {key.domain} and its subdomains"
    if key.state == "standby":
        return (f"standby: publish the record, then switch to it with "
                f"`flask dkim activate {key.domain} {key.selector}`")
    return "retired: signs nothing; remove the record once mail it signed is delivered"


@dkim_cli.command("create")
@click.option("--domain", required=True, help="The signing domain (d=), e.g. example.com.")
@click.option("--selector", default=None,
              help=f"The selector (s=): {SELECTOR_RULE}. Default: ALGORITHM-YYYYMMDD.")
@click.option("--algorithm", type=click.Choice(keys.ALGORITHMS), default="rsa",
              show_default=True, help="rsa (2048 bits, every receiver) or ed25519 (RFC 8463; "
                                      "add it beside an RSA key).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def create_cmd(domain: str, selector: str | None, algorithm: str, as_json: bool) -> None:
    """Create a key and print the DNS record to publish (never the private key)."""
    key = keys.create_key(db.session(), domain, selector, algorithm)
    if as_json:
        emit_json(DkimKeySchema().dump(key))
        return
    click.echo(f"Created DKIM key {key.selector} for {key.domain} ({key.algorithm}): "
               f"{_state_words(key)}.")
    _print_record(key)


@dkim_cli.command("list")
@click.option("--domain", default=None, help="Only the keys of this domain.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def list_cmd(domain: str | None, as_json: bool) -> None:
    """List keys (retired ones included)."""
    rows = keys.list_keys(db.session(), domain)
    if as_json:
        emit_json(DkimKeySchema(many=True).dump(rows))
        return
    click.echo(f"{'ID':>4}  {'DOMAIN':<28} {'SELECTOR':<22} {'ALGORITHM':<9} {'STATE':<8} "
               "CREATED")
    for key in rows:
        click.echo(f"{key.id:>4}  {key.domain:<28} {key.selector:<22} {key.algorithm:<9} "
                   f"{key.state:<8} {isoformat_z(key.created_at)}")


def _key_arguments(func: Any) -> Any:
    func = click.argument("selector")(func)
    return click.argument("domain")(func)


@dkim_cli.command("show")
@_key_arguments
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def show_cmd(domain: str, selector: str, as_json: bool) -> None:
    """Show one key and its DNS record."""
    key = keys.find_key(db.session(), domain, selector)
    if as_json:
        emit_json(DkimKeySchema().dump(key))
        return
    click.echo(f"DKIM key {key.selector} of {key.domain} (id {key.id}, {key.algorithm}): "
               f"{_state_words(key)}.")
    for label, value in (("created", key.created_at), ("activated", key.activated_at),
                         ("retired", key.retired_at)):
        if value is not None:
            click.echo(f"  {label + ':':<11}{isoformat_z(value)}")
    _print_record(key)


@dkim_cli.command("activate")
@_key_arguments
@reports_errors
def activate_cmd(domain: str, selector: str) -> None:
    """Switch signing to a standby key (rotation); the key it replaces is retired."""
    key, retired = keys.activate_key(db.session(), keys.find_key(db.session(), domain, selector))
    click.echo(f"DKIM key {key.selector} now signs mail from {key.domain} ({key.algorithm}).")
    for old in retired:
        click.echo(f"Retired {old.selector}: keep its record published for a few days (mail "
                   "it signed may still be in queues), then remove it.")


@dkim_cli.command("retire")
@_key_arguments
@reports_errors
def retire_cmd(domain: str, selector: str) -> None:
    """Stop signing with a key, for good."""
    key = keys.retire_key(db.session(), keys.find_key(db.session(), domain, selector))
    click.echo(f"DKIM key {key.selector} of {key.domain} retired: it signs nothing from now on.")
