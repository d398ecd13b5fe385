"""``flask logs show|events|prune``: the same services as ``/api/logs`` and the handler."""

from __future__ import annotations

import logging
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from ..cli import emit_json, reports_errors
from ..extensions import db
from ..models import EVENT_TYPES
from ..stats.classify import FAILURE_CLASSES
from . import service
from .levels import ACCEPTED, levelno_of
from .schemas import MessageEventListSchema, SystemLogListSchema

log = logging.getLogger("elemta.logs")

logs_cli = AppGroup("logs", help="System logs and message events stored in the database.")


@logs_cli.command("show")
@click.option("--level", type=click.Choice(ACCEPTED, case_sensitive=False),
              help="Minimum severity (default: all).")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the API's answer).")
def logs_show_cmd(level: str | None, limit: int, as_json: bool) -> None:
    """System log records of every process, newest first."""
    rows = service.list_system_logs(db.session(), min_levelno=levelno_of(level) if level else None,
                                    limit=limit)
    body = SystemLogListSchema().dump({"logs": rows, "count": len(rows)})
    if as_json:
        emit_json(body)
        return
    if not body["logs"]:
        # Silence would look like a broken command.
        click.echo(f"No log records{' at ' + level + ' or above' if level else ''}.")
    for item in body["logs"]:
        click.echo(f"{item['timestamp']} {item['level']:<5} {item['process']:<14} "
                   f"{item['logger']}: {item['message']}")


@logs_cli.command("events")
@click.option("--event-type", type=click.Choice(EVENT_TYPES), help="Only this type.")
@click.option("--message-id", help="Exact message id.")
@click.option("--recipient", help="Exact recipient address.")
@click.option("--failure-class", type=click.Choice(FAILURE_CLASSES),
              help="Only failures of this class.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--cursor", help="Continue after a previous page (its next_cursor).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the API's answer).")
@reports_errors
def logs_events_cmd(limit: int, as_json: bool, **filters: Any) -> None:
    """Message delivery events, newest first."""
    page = service.list_message_events(db.session(), limit=limit, **filters)
    body = MessageEventListSchema().dump({"logs": page.items, "count": len(page.items),
                                          "next_cursor": page.next_cursor})
    if as_json:
        emit_json(body)
        return
    if not body["logs"]:
        click.echo("No message events match.")
    for item in body["logs"]:
        why = f" [{item['failure_class']}]" if item["failure_class"] else ""
        click.echo(f"{item['timestamp']} {item['event_type']:<9} {item['message_id'] or '-'} "
                   f"{item['recipient'] or '-'}  {item['message'] or ''}{why}")
    if page.next_cursor:
        click.echo(f"next: --cursor {page.next_cursor}")


@logs_cli.command("prune")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def logs_prune_cmd(as_json: bool) -> None:
    """Delete system log records older than ELEMTA_LOG_RETENTION now (the handler also does)."""
    retention = current_app.config["LOG_RETENTION"]
    count = service.prune_now(db.session(), retention)
    log.info("pruned %d system log record(s) older than %d s", count, retention)
    if as_json:
        emit_json({"pruned": count, "retention": retention})
    else:
        click.echo(f"{count} record(s) pruned")
