"""``flask stats delivery`` and ``flask stats rebuild``: the same services as the API."""

from __future__ import annotations

import datetime as dt

import click
from flask.cli import AppGroup

from ..cli import emit_json, iso_timestamp
from ..extensions import db
from . import service
from .schemas import DeliveryStatsSchema, DomainStatsSchema

stats_cli = AppGroup("stats", help="Delivery statistics and their hourly rollup.")


@stats_cli.command("delivery")
@click.option("--time-scale", type=click.Choice(service.TIME_SCALES), default="hour",
              show_default=True, help="Bucket size of the window.")
@click.option("--domain", help="Only this recipient domain.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the API's answer).")
def stats_delivery_cmd(time_scale: str, domain: str | None, as_json: bool) -> None:
    """Delivery outcomes per bucket, newest first, with totals and the success rate."""
    domain = domain.strip().lower() if domain else None
    stats = DeliveryStatsSchema().dump(service.delivery_stats(db.session(), time_scale,
                                                              domain=domain))
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
    """Recompute the hourly and per-domain rollups from the delivery events (repair tool;
    also classifies events recorded before migration 0007)."""
    rows = service.rebuild(db.session(), since, until)
    if as_json:
        emit_json({"rollup_rows": rows})
    else:
        click.echo(f"Rollup rebuilt: {rows} hour/outcome row(s)")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size:
            return f"{value / size:.0f}{unit}"
    return f"{value:.0f}s"


@stats_cli.command("domains")
@click.option("--time-scale", type=click.Choice(service.TIME_SCALES), default="day",
              show_default=True, help="The window: that of /api/stats/delivery.")
@click.option("--sort", type=click.Choice(service.DOMAIN_SORTS), default="volume",
              show_default=True)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the API's answer).")
def stats_domains_cmd(time_scale: str, sort: str, limit: int, as_json: bool) -> None:
    """Per recipient domain: outcomes, rates, top failure classes, latency p50/p95."""
    stats = DomainStatsSchema().dump(service.domain_stats(db.session(), time_scale, limit=limit,
                                                          sort=sort))
    if as_json:
        emit_json(stats)
        return
    if not stats["domains"]:
        click.echo(f"No delivery outcomes since {stats['since']}.")
        return
    click.echo(f"{'domain':<28}{'delivered':>10}{'failed':>8}{'deferred':>9}{'fail%':>7}"
               f"{'defer%':>7}{'p50':>6}{'p95':>6}  top failure classes")
    for d in stats["domains"]:
        classes = ", ".join(f"{c['failure_class']} {c['count']}" for c in d["failure_classes"])
        click.echo(f"{d['domain'][:27]:<28}{d['delivered']:>10}{d['failed']:>8}"
                   f"{d['deferred']:>9}{d['failure_rate']:>7}{d['deferral_rate']:>7}"
                   f"{_seconds(d['latency_p50']):>6}{_seconds(d['latency_p95']):>6}  {classes}")
    click.echo(f"-- {len(stats['domains'])} of {stats['total_domains']} domain(s), "
               f"{stats['since']} to {stats['until']}", err=True)
