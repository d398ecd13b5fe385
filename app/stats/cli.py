"""``flask stats delivery`` and ``flask stats rebuild``: the same services as the API."""

from __future__ import annotations

import datetime as dt

import click
from flask.cli import AppGroup

from ..cli import emit_json, iso_timestamp
from ..extensions import db
from . import service
from .schemas import DeliveryStatsSchema

stats_cli = AppGroup("stats", help="Delivery statistics and their hourly rollup.")


@stats_cli.command("delivery")
@click.option("--time-scale", type=click.Choice(service.TIME_SCALES), default="hour",
              show_default=True, help="Bucket size of the window.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the API's answer).")
def stats_delivery_cmd(time_scale: str, as_json: bool) -> None:
    """Delivery outcomes per bucket, newest first, with totals and the success rate."""
    stats = DeliveryStatsSchema().dump(service.delivery_stats(db.session, time_scale))
    if as_json:
        emit_json(stats)
        return
    click.echo(f"{'bucket':<12}{'delivered':>11}{'failed':>9}{'deferred':>10}")
    for bucket in stats["data"]:
        click.echo(f"{bucket['label']:<12}{bucket['delivered']:>11}{bucket['failed']:>9}"
                   f"{bucket['deferred']:>10}")
    click.echo(f"{'total':<12}{stats['total_delivered']:>11}{stats['total_failed']:>9}"
               f"{stats['total_deferred']:>10}")
    click.echo(f"success rate: {stats['success_rate']}%")
    for error in stats["recent_errors"]:
        click.echo(f"  {error['timestamp']} {error['status']:<9} {error['message_id']} "
                   f"{error['recipient']}  {error['error'] or ''}")


@stats_cli.command("rebuild")
@click.option("--since", callback=iso_timestamp, help="Only hours from this instant (ISO 8601).")
@click.option("--until", callback=iso_timestamp, help="Only hours before this instant (ISO 8601).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats_rebuild_cmd(since: dt.datetime | None, until: dt.datetime | None,
                      as_json: bool) -> None:
    """Recompute the hourly rollup from the delivery events (repair tool)."""
    rows = service.rebuild(db.session, since, until)
    if as_json:
        emit_json({"rollup_rows": rows})
    else:
        click.echo(f"Rollup rebuilt: {rows} hour/outcome row(s)")
