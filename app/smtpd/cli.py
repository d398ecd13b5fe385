"""``flask smtpd``: run the SMTP listener in the foreground."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import with_appcontext

from ..config import ConfigError
from .server import ListenerConfigError, ListenerSettings, parse_listen, serve


@click.command("smtpd")
@click.option("--listen", metavar="HOST:PORT",
              help="Address to listen on (default: ELEMTA_SMTP_LISTEN, 127.0.0.1:2525).")
@with_appcontext
def smtpd_cmd(listen: str | None) -> None:
    """Accept mail over SMTP into the queue (SIGTERM/Ctrl-C: finish messages under way, exit)."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        overrides = {}
        if listen:
            overrides["host"], overrides["port"] = parse_listen(listen)
        settings = ListenerSettings.from_config(app.config, **overrides)
        click.echo(f"smtpd: listening on {settings.host}:{settings.port}", err=True)
        serve(app, settings)
    except (ListenerConfigError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
