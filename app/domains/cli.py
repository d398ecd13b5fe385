"""``flask domain check DOMAIN``: the same report as ``GET /api/domains/{domain}/check``."""

from __future__ import annotations

from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from ..cli import emit_json, reports_errors
from ..extensions import db
from .check import check_domain
from .schemas import DomainReportSchema

domain_cli = AppGroup("domain", help="What receivers see of a sending domain.")

TITLES = {"spf": "SPF", "dkim": "DKIM", "dmarc": "DMARC", "mx": "Return path (MX)",
          "fcrdns": "Reverse DNS", "mta_sts": "MTA-STS"}


def _print_item(item: dict[str, Any]) -> None:
    click.echo(f"[{item['status'].upper():<4}] {TITLES.get(item['name'], item['name'])}")
    click.echo(f"       {item['summary']}")
    for record in item["found"]:
        click.echo(f"       found:   {record}")
    for line in item["details"]:
        click.echo(f"       - {line}")
    for record in item["publish"]:
        click.echo(f"       publish: {record['name']}. {record['type']} \"{record['value']}\""
                   if record["type"] == "TXT" else
                   f"       publish: {record['name']}. {record['type']} {record['value']}")
    click.echo("")


@domain_cli.command("check")
@click.argument("domain")
@click.option("--cached", is_flag=True, help="Reuse a recent report of this process "
                                             "(the API does); default: ask DNS now.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@reports_errors
def check_cmd(domain: str, cached: bool, as_json: bool) -> None:
    """Check SPF, DKIM, DMARC, MX, reverse DNS and MTA-STS of DOMAIN as receivers see it."""
    report = DomainReportSchema().dump(
        check_domain(db.session(), domain, current_app.config, refresh=not cached))
    if as_json:
        emit_json(report)
        return
    ips = ", ".join(report["sending_ips"]) or "none set (ELEMTA_SENDING_IPS)"
    click.echo(f"Domain check for {report['domain']}: {report['status'].upper()}")
    age = f", a cached report {report['age_seconds']} s old" if report["cached"] else ""
    click.echo(f"  checked {report['checked_at']}{age}; sending IPs: {ips}; "
               f"EHLO name: {report['hostname']}")
    click.echo("")
    for item in report["checks"]:
        _print_item(item)
    fixes = sum(len(item["publish"]) for item in report["checks"] if item["status"] == "fail")
    if fixes:
        click.echo(f"{fixes} record(s) to publish or fix above; receivers cache DNS answers, so "
                   "allow for the records' TTL before checking again.")
