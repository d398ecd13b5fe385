"""``flask smtpd``: run the SMTP listener in the foreground."""

from __future__ import annotations

from typing import Any

import click
from flask import current_app
from flask.cli import with_appcontext

from ..config import ConfigError
from .processes import serve_port
from .server import ListenerConfigError, ListenerSettings, parse_listen


@click.command("smtpd")
@click.option("--listen", metavar="HOST:PORT",
              help="Address to listen on (default: ELEMTA_SMTP_LISTEN, 127.0.0.1:2525).")
@with_appcontext
def smtpd_cmd(listen: str | None) -> None:
    """Accept mail over SMTP into the queue (SIGTERM/Ctrl-C: finish messages under way, exit).

    ELEMTA_SMTPD_PROCESSES listener processes share the port (auto: one per two CPUs, 1-4)."""
    # The app itself, not the proxy: Flask types current_app as Flask, not as a LocalProxy.
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        overrides: dict[str, Any] = {}
        if listen:
            overrides["host"], overrides["port"] = parse_listen(listen)
        settings = ListenerSettings.from_config(app.config, **overrides)
        # Said once the port is bound: a busy port gives "Cannot listen ..." alone.
        processes = f" ({settings.processes} processes)" if settings.processes > 1 else ""
        serve_port(app, settings, on_listening=lambda: click.echo(
            f"smtpd: listening on {settings.host}:{settings.port}{processes}", err=True))
    except (ListenerConfigError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
