"""``flask webhook ...``: the same service as ``/api/webhooks``, and the dispatcher process."""

from __future__ import annotations

import signal
import sys

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext

from ..cli import emit_json, reports_errors
from ..extensions import db
from ..models import WEBHOOK_EVENT_TYPES
from ..timeutil import isoformat_z
from . import service
from .dispatcher import Dispatcher, setting
from .schemas import WebhookDeliverySchema, WebhookSchema

webhook_cli = AppGroup("webhook", help="Signed webhooks: create, list, show, update, delete, "
                                       "deliveries, redeliver, dispatch.")


def _types(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


_EVENTS_HELP = "Comma-separated event types: " + ",".join(WEBHOOK_EVENT_TYPES) + "."


def _print_created(created: service.Created, verb: str) -> None:
    hook = created.webhook
    click.echo(f"{verb} webhook {hook.id}: {hook.url} ({', '.join(hook.event_types)})")
    if created.secret:
        click.echo("Signing secret (shown once; the receiver checks Elemta-Signature with it):")
        click.echo(created.secret)


@webhook_cli.command("create")
@click.option("--url", required=True, help="http(s) URL of the receiver.")
@click.option("--events", required=True, help=_EVENTS_HELP)
@click.option("--description", default="", help="A note for operators.")
@click.option("--secret", default=None, help="The signing secret (default: generated).")
@click.option("--inactive", is_flag=True, help="Create it paused.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the secret included).")
@reports_errors
def create_cmd(url: str, events: str, description: str, secret: str | None, inactive: bool,
               as_json: bool) -> None:
    """Create a webhook; prints its secret once."""
    created = service.create_webhook(db.session(), url, _types(events) or [],
                                     description=description, secret=secret,
                                     active=not inactive)
    if as_json:
        emit_json({**WebhookSchema().dump(created.webhook), "secret": created.secret})
        return
    _print_created(created, "Created")


@webhook_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def list_cmd(as_json: bool) -> None:
    """List webhooks (never their secrets)."""
    hooks = service.list_webhooks(db.session())
    if as_json:
        emit_json(WebhookSchema(many=True).dump(hooks))
        return
    click.echo(f"{'ID':>4}  {'ACTIVE':<6}  {'URL':<48} EVENTS")
    for hook in hooks:
        click.echo(f"{hook.id:>4}  {'yes' if hook.active else 'no':<6}  {hook.url:<48} "
                   f"{','.join(hook.event_types)}")


@webhook_cli.command("show")
@click.argument("webhook_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def show_cmd(webhook_id: int, as_json: bool) -> None:
    """One webhook."""
    data = WebhookSchema().dump(service.get_webhook(db.session(), webhook_id))
    if as_json:
        emit_json(data)
        return
    for name, value in data.items():
        click.echo(f"{name}: {', '.join(value) if isinstance(value, list) else value}")


@webhook_cli.command("update")
@click.argument("webhook_id", type=int)
@click.option("--url", default=None, help="New receiver URL.")
@click.option("--events", default=None, help=_EVENTS_HELP)
@click.option("--description", default=None)
@click.option("--active/--inactive", default=None, help="Resume or pause sending.")
@click.option("--rotate-secret", is_flag=True, help="Generate a new secret (printed once).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def update_cmd(webhook_id: int, url: str | None, events: str | None, description: str | None,
               active: bool | None, rotate_secret: bool, as_json: bool) -> None:
    """Change a webhook."""
    created = service.update_webhook(db.session(), webhook_id, url=url, event_types=_types(events),
                                     description=description, active=active,
                                     rotate_secret=rotate_secret)
    if as_json:
        emit_json({**WebhookSchema().dump(created.webhook), "secret": created.secret})
        return
    _print_created(created, "Updated")


@webhook_cli.command("delete")
@click.argument("webhook_id", type=int)
@reports_errors
def delete_cmd(webhook_id: int) -> None:
    """Delete a webhook and its delivery history."""
    service.delete_webhook(db.session(), webhook_id)
    click.echo(f"Webhook {webhook_id} deleted")


@webhook_cli.command("deliveries")
@click.argument("webhook_id", type=int)
@click.option("--status", type=click.Choice(service.DELIVERY_STATES), default=None)
@click.option("--message-id", default=None, help="Only the events of this message.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (bodies and attempts).")
@reports_errors
def deliveries_cmd(webhook_id: int, status: str | None, message_id: str | None, limit: int,
                   as_json: bool) -> None:
    """A webhook's deliveries, newest first."""
    page = service.list_deliveries(db.session(), webhook_id, status=status, message_id=message_id,
                                   limit=limit)
    if as_json:
        emit_json(WebhookDeliverySchema(many=True).dump(page.items))
        return
    click.echo(f"{'N':>6}  {'EVENT':<14} {'TYPE':<10} {'STATUS':<9} {'TRIES':>5}  {'LAST':<5} "
               "MESSAGE / NEXT TRY")
    for d in page.items:
        last = d.last_status_code if d.last_status_code is not None else "-"
        after = f" next {isoformat_z(d.next_attempt_at)}" if d.next_attempt_at else ""
        click.echo(f"{d.id:>6}  evt_{d.event_id:<10} {d.event_type:<10} {d.status:<9} "
                   f"{d.attempts:>5}  {last!s:<5} {d.message_id or '-'}{after}")


@webhook_cli.command("redeliver")
@click.argument("webhook_id", type=int)
@click.argument("delivery_id", type=int)
@reports_errors
def redeliver_cmd(webhook_id: int, delivery_id: int) -> None:
    """Send a delivery again (same body and event id)."""
    window = int(setting(current_app.config, "WEBHOOK_RETRY_WINDOW"))
    delivery = service.redeliver(db.session(), webhook_id, delivery_id, window)
    click.echo(f"Delivery {delivery.id} (evt_{delivery.event_id}) will be sent again")


@webhook_cli.command("dispatch")
@click.option("--once", is_flag=True, help="Send everything due now, then exit.")
@with_appcontext
def dispatch_cmd(once: bool) -> None:
    """Run the webhook dispatcher: tail message events, POST them signed, retry, record.

    Runs beside the delivery worker (one per database). SIGTERM or Ctrl-C: finish the
    requests under way (at most ELEMTA_WEBHOOK_TIMEOUT), record them, exit 0.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    dispatcher = Dispatcher(app)
    if once:
        queued, attempts = dispatcher.run_pass()
        click.echo(f"{queued} event(s) queued, {attempts} request(s) made")
        return

    def _stop(_signum: int, _frame: object) -> None:
        dispatcher.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sys.exit(dispatcher.run())
