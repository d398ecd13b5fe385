"""``flask queue …``: inspect and act on the mail queue, with the same services as the API."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from ..cli import emit_json, iso_timestamp, reports_errors
from ..delivery.diagnosis import DiagnosisSettings, diagnose
from ..extensions import db
from . import service
from .schemas import DiagnosisSchema, MessageDetailSchema, MessageSchema, QueueShapeSchema
from .shape import BUCKETS, SHAPE_QUEUES

CLI_ACTOR = "cli"

queue_cli = AppGroup("queue", help="Inspect and act on the mail queue.")


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--sender", help="Case-insensitive substring of the sender."),
        click.option("--recipient", help="Case-insensitive substring of a recipient."),
        click.option("--domain", help="Exact recipient domain."),
        click.option("--before", callback=iso_timestamp, help="Created before (ISO 8601)."),
        click.option("--after", callback=iso_timestamp, help="Created after (ISO 8601)."),
    ]):
        func = option(func)
    return func


def _filters(kwargs: dict[str, Any]) -> service.MessageFilters:
    return service.MessageFilters(**{k: kwargs.pop(k) for k in
                                     ("sender", "recipient", "domain", "before", "after")})


@queue_cli.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def queue_stats_cmd(as_json: bool) -> None:
    """Number of messages per queue state."""
    stats = service.queue_stats(db.session())
    if as_json:
        emit_json(stats)
        return
    for state, count in stats.items():
        click.echo(f"{state:<10}{count:>10}")


@queue_cli.command("shape")
@click.option("--queue", "queue_type", type=click.Choice(SHAPE_QUEUES), default="all",
              show_default=True, help="Queue state to shape.")
@click.option("--by", type=click.Choice(["domain", "sender_domain"]), default="domain",
              show_default=True,
              help="domain: recipients not yet delivered; sender_domain: messages.")
@click.option("--top", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="Domains listed; the rest are summed in 'other'.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (as the API answers).")
@reports_errors
def queue_shape_cmd(queue_type: str, by: str, top: int, as_json: bool) -> None:
    """Queued mail per domain and age bucket, as Postfix's qshape."""
    shape = service.read_shape(db.session(), queue_type, by, top)
    if as_json:
        emit_json(QueueShapeSchema().dump(shape))
        return
    width = max([len("other"), len("TOTAL")] + [len(row.domain) for row in shape.rows])
    click.echo(f"{'':<{width}} {'T':>7}" + "".join(f" {b:>8}" for b in BUCKETS))
    lines = [("TOTAL", shape.total), *((row.domain or "<>", row) for row in shape.rows)]
    if shape.other_domains:
        lines.append(("other", shape.other))
    for name, row in lines:
        click.echo(f"{name:<{width}} {row.total:>7}" + "".join(f" {n:>8}" for n in row.buckets))
    what = "recipients" if by == "domain" else "messages"
    click.echo(f"-- {what} of queue {queue_type} as of {shape.as_of:%Y-%m-%d %H:%M:%S}Z"
               + (f"; other = {shape.other_domains} more domain(s)" if shape.other_domains
                  else ""), err=True)


@queue_cli.command("list")
@click.argument("queue_type", metavar="TYPE",
                type=click.Choice(service.LIST_TYPES))
@filter_options
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--cursor", help="Continue from the cursor printed by a previous page.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def queue_list_cmd(queue_type: str, limit: int, cursor: str | None, as_json: bool,
                   **kwargs: Any) -> None:
    """List messages of a queue, oldest first."""
    page = service.list_messages(db.session(), queue_type, _filters(kwargs), limit=limit,
                                 cursor=cursor)
    if as_json:
        emit_json({"messages": MessageSchema(many=True).dump(page.items), "total": page.total,
                   "next_cursor": page.next_cursor})
        return
    for m in page.items:
        to = ",".join(r.address for r in m.recipients)
        click.echo(f"{m.id}  {m.queue_state:<8} {m.created_at:%Y-%m-%d %H:%M:%S}  "
                   f"{m.sender or '<>'} -> {to}  {m.subject[:40]}")
    click.echo(f"-- {len(page.items)} of {page.total}", err=True)
    if page.next_cursor:
        click.echo(f"-- next page: --cursor {page.next_cursor}", err=True)


@queue_cli.command("show")
@click.argument("message_id")
@click.option("--raw", is_flag=True, help="Print the raw message.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def queue_show_cmd(message_id: str, raw: bool, as_json: bool) -> None:
    """Show one message: envelope, recipients and timeline."""
    if raw:
        sys.stdout.buffer.write(service.message_raw(db.session(), message_id))
        return
    detail = MessageDetailSchema().dump(service.message_detail(db.session(), message_id))
    if as_json:
        emit_json(detail)
        return
    for key in ("id", "queue", "from", "subject", "size", "attempts", "created_at",
                "next_attempt_at", "last_error"):
        click.echo(f"{key + ':':<17}{detail[key]}")
    signed = ", ".join(f"{s['selector']}._domainkey.{s['domain']} ({s['algorithm']})"
                       for s in detail["dkim"])
    click.echo(f"{'dkim:':<17}{signed or 'not signed'}")
    for r in detail["recipients"]:
        click.echo(f"  {r['address']:<40} {r['status']:<10} attempts={r['attempts']} "
                   f"{r['last_error'] or ''}")
    for e in detail["events"]:
        click.echo(
            f"  {e['timestamp']} {e['event_type']:<10} {e['recipient'] or ''} {e['message'] or ''}")


@queue_cli.command("why")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (as the API answers).")
@reports_errors
def queue_why_cmd(message_id: str, as_json: bool) -> None:
    """Why a message is still queued: attempts, schedule, lease, rules, policy."""
    diagnosis = diagnose(db.session(), message_id,
                         DiagnosisSettings.from_config(current_app.config))
    if as_json:
        emit_json(DiagnosisSchema().dump(diagnosis))
        return
    click.echo(diagnosis.headline)
    for r in diagnosis.recipients:
        click.echo(f"  {r.summary}")
        for attempt in r.attempts:
            click.echo(f"    {attempt.timestamp:%Y-%m-%d %H:%M:%S}Z {attempt.event_type:<9} "
                       f"{attempt.delivery_host or '-'}  {attempt.message or ''}")
        if r.planned_attempts:
            shown = ", ".join(f"{t:%m-%d %H:%M}" for t in r.planned_attempts[:6])
            more = f" (+{len(r.planned_attempts) - 6} more)" if len(r.planned_attempts) > 6 \
                else ""
            click.echo(f"    planned (UTC, if each attempt fails): {shown}{more}")


@queue_cli.command("delete")
@click.argument("message_ids", nargs=-1, required=True, metavar="ID...")
@reports_errors
def queue_delete_cmd(message_ids: tuple[str, ...]) -> None:
    """Delete messages from the queue."""
    for message_id in message_ids:
        service.delete_message(db.session(), message_id, CLI_ACTOR)
        click.echo(f"Message {message_id} deleted")


@queue_cli.command("flush")
@click.argument("queue_type", metavar="TYPE", type=click.Choice(service.LIST_TYPES))
@filter_options
@click.option("--dry-run", is_flag=True, help="Only count what would be flushed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def queue_flush_cmd(queue_type: str, dry_run: bool, as_json: bool, **kwargs: Any) -> None:
    """Delete every (matching) message of a queue."""
    count = service.bulk_action(db.session(), "flush", queue_type, _filters(kwargs), CLI_ACTOR,
                                dry_run=dry_run)
    _report_bulk("flush", queue_type, count, dry_run, as_json)


def _report_bulk(action: str, queue_type: str, count: int, dry_run: bool, as_json: bool) -> None:
    done = service.PAST_TENSE[action]
    if as_json:
        emit_json({"action": action, "queue": queue_type, "count": count, "dry_run": dry_run})
    else:
        click.echo(f"{count} message(s) {'would be ' if dry_run else ''}{done}")


SINGLE_ACTIONS: dict[str, Callable[..., Any]] = {
    "retry": service.retry_message,
    "hold": service.hold_message,
    "release": service.release_message,
}


def _action_command(action: str, help_text: str) -> None:
    types = service.BULK_TYPES[action]

    @queue_cli.command(action, help=help_text)
    @click.argument("message_ids", nargs=-1, metavar="[ID...]")
    @click.option("--queue", "queue_type", type=click.Choice(types),
                  help="Act on every matching message of this queue instead of on IDs.")
    @filter_options
    @click.option("--dry-run", is_flag=True, help="Only count what would be affected.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @reports_errors
    def command(message_ids: tuple[str, ...], queue_type: str | None, dry_run: bool,
                as_json: bool, **kwargs: Any) -> None:
        filters = _filters(kwargs)
        if bool(message_ids) == bool(queue_type):
            raise click.UsageError("give message IDs or --queue TYPE (not both)")
        if queue_type:
            count = service.bulk_action(db.session(), action, queue_type, filters, CLI_ACTOR,
                                        dry_run=dry_run)
            _report_bulk(action, queue_type, count, dry_run, as_json)
            return
        for message_id in message_ids:
            SINGLE_ACTIONS[action](db.session(), message_id, CLI_ACTOR)
            click.echo(f"Message {message_id} {service.PAST_TENSE[action]}")


_action_command("retry", "Make messages due now (failed recipients get another chance).")
_action_command("hold", "Put messages on hold.")
_action_command("release", "Release held messages; they become due now.")
