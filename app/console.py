"""``elemta``: the operator's command (setup.cfg's console script; ``make setup`` installs it).

The same commands as ``flask`` (the groups of ``create_app``'s ``register_cli`` and
Flask-Migrate's ``db``), under a help that lists Elemta's groups instead of Flask's generic
blurb and its development server (``run``, ``shell`` and ``routes`` are left out). It needs no
``FLASK_APP`` and works from any directory: the application is built by ``create_app``, and its
instance directory and migrations are found next to the package. ``elemta api`` runs the API
under gunicorn, as ``deploy/elemta`` and the systemd unit do.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import click
from flask import Flask
from flask.cli import FlaskGroup

from . import create_app, serves_http
from .config import ConfigError
from .version import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_HELP = 66

# The order the help lists them in: services first, then day-to-day administration.
SECTIONS = (
    ("Services", ("api", "worker", "smtpd")),
    ("Queue and history", ("queue", "logs", "stats")),
    ("Delivery control", ("policy", "suppression", "rule")),
    ("Keys, signing and DNS", ("apikey", "dkim", "domain")),
    ("Database and demo data", ("db", "demo")),
)


def load_app(argv: list[str] | None = None) -> Flask:
    """The application for the command line ``argv``: without its HTTP side for the services
    that answer no HTTP request (``elemta worker``, ...; ``create_app``)."""
    try:
        return create_app(serve_http=argv is None or serves_http(argv))
    except ConfigError as exc:
        # As wsgi.py: a refused setting is one line and status 2, before any command runs.
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)


class ElemtaGroup(FlaskGroup):
    """FlaskGroup without Flask's development commands, its help grouped by purpose.

    ``services_only`` (``elemta worker``, ``elemta smtpd``, ``elemta webhook dispatch``): no
    discovery of other packages' ``flask.commands`` plugins. None of them is a service, and
    loading them (Flask-Limiter's ``limiter`` group: rich, attrs, ...) was a tenth of the
    worker's start-up (docs/PERFORMANCE.md, "Worker start-up, second pass").
    """

    services_only = False

    def _load_plugin_commands(self) -> None:
        if not self.services_only:
            super()._load_plugin_commands()

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        found = {name: self.get_command(ctx, name) for name in self.list_commands(ctx)}
        commands = {name: cmd for name, cmd in found.items() if cmd is not None}
        listed: set[str] = set()
        for title, names in SECTIONS:
            rows = [(name, commands[name].get_short_help_str(limit=SHORT_HELP))
                    for name in names if name in commands]
            listed.update(names)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        others = [(name, cmd.get_short_help_str(limit=SHORT_HELP))
                  for name, cmd in commands.items() if name not in listed]
        if others:
            with formatter.section("Other commands"):
                formatter.write_dl(others)


@click.command("api", context_settings={"ignore_unknown_options": True},
               add_help_option=False)
@click.argument("gunicorn_args", nargs=-1, type=click.UNPROCESSED)
def api_cmd(gunicorn_args: tuple[str, ...]) -> None:
    """The REST + WebSocket API under gunicorn.

    Configured by gunicorn.conf.py; extra arguments go to gunicorn.
    """
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    # exec: signals (SIGTERM, SIGHUP) reach gunicorn's master directly, as under systemd.
    os.execv(gunicorn, [gunicorn, "--chdir", ROOT, "-c", os.path.join(ROOT, "gunicorn.conf.py"),
                        *gunicorn_args, "wsgi:app"])


def build(argv: list[str] | None = None) -> ElemtaGroup:
    group = ElemtaGroup(
        name="elemta", create_app=functools.partial(load_app, argv),
        add_default_commands=False,
        add_version_option=False,
        help="Elemta, a mail transfer agent: the services and the operator's commands.\n\n"
             "Settings come from ELEMTA_* environment variables (docs/OPERATIONS.md). "
             "Every command has --help; data commands offer --json.")
    # --app names another application, --debug the reloader, --env-file needs python-dotenv.
    group.params = [p for p in group.params if p.name not in ("app", "debug", "env_file")]
    group.add_command(api_cmd)
    group.services_only = argv is not None and not serves_http(argv)
    click.version_option(__version__, prog_name="elemta")(group)
    return group


def main(argv: list[str] | None = None) -> Any:
    if argv is None:
        argv = sys.argv[1:]
    return build(argv).main(args=argv, prog_name="elemta")
