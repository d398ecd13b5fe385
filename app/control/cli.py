"""``flask policy|suppression|rule ...``: the same services as the endpoints (actor ``cli``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from ..cli import emit_json, iso_timestamp, reports_errors
from ..extensions import db
from ..timeutil import isoformat_z
from . import policies, rules, state, suppression
from .schemas import DestinationStateSchema, PolicySchema, RuleSchema, SuppressionSchema

policy_cli = AppGroup("policy", help="Destination policies: connection and rate limits.")
suppression_cli = AppGroup("suppression", help="The suppression list.")
rule_cli = AppGroup("rule", help="Rules: hold, defer or bounce matching mail until expiry.")

ACTOR = "cli"


def _limit_options(func: Any) -> Any:
    for name, text in reversed((
            ("max-connections", "Connections open at once (all workers and hosts)."),
            ("per-connection", "Messages per connection."),
            ("per-minute", "Messages per minute."),
            ("per-hour", "Messages per hour."))):
        func = click.option(f"--{name}", type=click.IntRange(0, policies.MAX_LIMIT),
                            default=None, help=f"{text} 0 removes the limit.")(func)
    return click.option("--require-tls/--no-require-tls", default=None,
                        help="Deliver only over STARTTLS.")(func)


def _limit_values(max_connections: int | None, per_connection: int | None,
                  per_minute: int | None, per_hour: int | None,
                  require_tls: bool | None) -> dict[str, Any]:
    given = {"max_connections": max_connections, "messages_per_connection": per_connection,
             "messages_per_minute": per_minute, "messages_per_hour": per_hour}
    values: dict[str, Any] = {k: (v or None) for k, v in given.items() if v is not None}
    if require_tls is not None:
        values["require_tls"] = require_tls
    return values


def _print_policy(policy: Any) -> None:
    click.echo(f"{policy.id:>4}  {policies.describe(policy)}")


@policy_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def policy_list(as_json: bool) -> None:
    """List destination policies."""
    rows = policies.list_policies(db.session())
    if as_json:
        emit_json(PolicySchema(many=True).dump(rows))
        return
    for policy in rows:
        _print_policy(policy)
    if not rows:
        click.echo("No policies: every destination gets ELEMTA_MAX_CONNECTIONS_PER_DOMAIN "
                   "connections and no rate limit.")


@policy_cli.command("add")
@click.option("--domain", help="A recipient domain (or *.domain for its subdomains).")
@click.option("--mx", help="An MX host name pattern, e.g. *.google.com.")
@click.option("--default", "is_default", is_flag=True, help="The policy of every destination.")
@_limit_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def policy_add(domain: str | None, mx: str | None, is_default: bool, as_json: bool,
               **limits: Any) -> None:
    """Create a policy (one of --domain, --mx, --default)."""
    if sum(bool(x) for x in (domain, mx, is_default)) != 1:
        raise click.UsageError("give exactly one of --domain, --mx, --default")
    kind = "default" if is_default else "domain" if domain else "mx"
    values = {"kind": kind, "pattern": domain or mx, **_limit_values(**limits)}
    policy = policies.create_policy(db.session(), values, ACTOR)
    if as_json:
        emit_json(PolicySchema().dump(policy))
    else:
        _print_policy(policy)


@policy_cli.command("update")
@click.argument("policy_id", type=int)
@_limit_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def policy_update(policy_id: int, as_json: bool, **limits: Any) -> None:
    """Change a policy's limits (0 removes a limit)."""
    policy = policies.update_policy(db.session(), policy_id, _limit_values(**limits), ACTOR)
    if as_json:
        emit_json(PolicySchema().dump(policy))
    else:
        _print_policy(policy)


@policy_cli.command("delete")
@click.argument("policy_id", type=int)
@reports_errors
def policy_delete(policy_id: int) -> None:
    """Delete a policy."""
    policies.delete_policy(db.session(), policy_id, ACTOR)
    click.echo(f"Policy {policy_id} deleted")


@policy_cli.command("state")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def policy_state(as_json: bool) -> None:
    """Destinations being limited now: backoff level, pause, connections, messages sent."""
    rows = state.destination_states(db.session())
    if as_json:
        emit_json(DestinationStateSchema(many=True).dump(rows))
        return
    for row in rows:
        paused = f" paused until {isoformat_z(row['paused_until'])}" if row["paused_until"] else ""
        click.echo(f"{row['destination']}: level {row['backoff_level']}{paused}, "
                   f"{row['connections']} connection(s), {row['sent_this_minute']} this minute, "
                   f"{row['sent_this_hour']} this hour")


# --------------------------------------------------------------------------- suppressions


@suppression_cli.command("list")
@click.option("--address", help="Case-insensitive substring of the address.")
@click.option("--source", type=click.Choice(suppression.SOURCES))
@click.option("--reason", help="Case-insensitive substring of the reason.")
@click.option("--include-expired", is_flag=True)
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def suppression_list(address: str | None, source: str | None, reason: str | None,
                     include_expired: bool, limit: int, as_json: bool) -> None:
    """List suppressed addresses, newest first."""
    rows, _, total = suppression.list_suppressions(
        db.session(), suppression.SuppressionFilters(address, source, reason, include_expired),
        limit=limit)
    if as_json:
        emit_json(SuppressionSchema(many=True).dump(rows))
        return
    for row in rows:
        until = f" (until {isoformat_z(row.expires_at)})" if row.expires_at else ""
        click.echo(f"{row.address}  {row.source}  {isoformat_z(row.created_at)}{until}  "
                   f"{row.reason}")
    click.echo(f"{len(rows)} of {total} shown")


@suppression_cli.command("add")
@click.argument("address")
@click.option("--reason", default="", help="Why (kept with the entry).")
@click.option("--expires", callback=iso_timestamp, help="ISO 8601 time it ends.")
@reports_errors
def suppression_add(address: str, reason: str, expires: dt.datetime | None) -> None:
    """Suppress an address."""
    row = suppression.add_suppression(db.session(), address, reason, expires, ACTOR)
    click.echo(f"{row.address} suppressed")


@suppression_cli.command("remove")
@click.argument("address")
@reports_errors
def suppression_remove(address: str) -> None:
    """Remove an address from the suppression list."""
    suppression.remove_suppression(db.session(), address, ACTOR)
    click.echo(f"{address} removed from the suppression list")


@suppression_cli.command("export")
@click.option("--include-expired", is_flag=True)
@reports_errors
def suppression_export(include_expired: bool) -> None:
    """Print the suppression list as CSV."""
    click.echo(suppression.export_csv(
        db.session(), suppression.SuppressionFilters(include_expired=include_expired)), nl=False)


@suppression_cli.command("import")
@click.argument("csv_file", type=click.File("r", encoding="utf-8-sig"), default="-")
@reports_errors
def suppression_import(csv_file: Any) -> None:
    """Import a CSV (header with 'address'; '-' reads stdin): all rows valid or none."""
    result = suppression.import_csv(db.session(), csv_file.read(), ACTOR)
    click.echo(f"{result['imported']} imported, {result['skipped']} suppressed already")


# --------------------------------------------------------------------------- rules


@rule_cli.command("list")
@click.option("--active", "only_active", is_flag=True, help="Only rules not expired.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def rule_list(only_active: bool, as_json: bool) -> None:
    """List rules with their hit counts."""
    rows = rules.list_rules(db.session(), include_expired=not only_active)
    if as_json:
        emit_json(RuleSchema(many=True).dump(rows))
        return
    for rule in rows:
        click.echo(f"{rule.id:>4}  {rule.action} {rules.describe_filter(rule)} until "
                   f"{isoformat_z(rule.expires_at)}: {rule.queued_matches} queued, "
                   f"{rule.hits} new")


@rule_cli.command("add")
@click.option("--action", type=click.Choice(["hold", "defer", "bounce"]), required=True)
@click.option("--sender", help="Case-insensitive substring of the envelope sender.")
@click.option("--recipient", help="Case-insensitive substring of a recipient.")
@click.option("--domain", help="A recipient domain (exact).")
@click.option("--minutes", type=click.IntRange(1, 525600), help="How long the rule lasts.")
@click.option("--until", "until", callback=iso_timestamp, help="When it ends (ISO 8601).")
@click.option("--comment", default="")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def rule_add(action: str, sender: str | None, recipient: str | None, domain: str | None,
             minutes: int | None, until: dt.datetime | None, comment: str,
             as_json: bool) -> None:
    """Make a rule: it acts on matching queued mail now, then on new mail until it ends."""
    if (minutes is None) == (until is None):
        raise click.UsageError("give --minutes or --until")
    rule = rules.create_rule(db.session(), action=action, expires_at=rules.expiry(until, minutes),
                             sender=sender, recipient=recipient, domain=domain,
                             comment=comment, actor=ACTOR, config=current_app.config)
    if as_json:
        emit_json(RuleSchema().dump(rule))
        return
    click.echo(f"Rule {rule.id}: {action} {rules.describe_filter(rule)} until "
               f"{isoformat_z(rule.expires_at)}; {rule.queued_matches} queued message(s) "
               "changed")


@rule_cli.command("delete")
@click.argument("rule_id", type=int)
@reports_errors
def rule_delete(rule_id: int) -> None:
    """End a rule now."""
    rules.delete_rule(db.session(), rule_id, ACTOR)
    click.echo(f"Rule {rule_id} deleted")
