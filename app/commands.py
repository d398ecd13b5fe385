"""The command group of a service process: ``flask worker``, ``flask smtpd``, ``flask webhook``.

An application built without its HTTP side (``create_app(serve_http=False)``) runs one service
command and nothing else. Its ``app.cli`` is a ``ServiceCommands``: it knows the three service
commands by name and imports only the module of the one looked up, so ``flask worker`` does not
import the SMTP listener (aiosmtpd, its process supervisor) nor the webhook dispatcher (its
marshmallow schemas, the metrics module and prometheus_client). The operator's groups (queue,
dkim, domain, ...) are not there at all: they come with the whole application
(``register_cli``). ``--help`` still lists the three, importing them then.
"""

from __future__ import annotations

import importlib

import click
from flask.cli import AppGroup

# Command name -> (module, attribute). The modules are imported by ``get_command`` only.
SERVICE_COMMANDS = {
    "worker": ("app.delivery.cli", "worker_cmd"),
    "smtpd": ("app.smtpd.cli", "smtpd_cmd"),
    "webhook": ("app.webhooks.cli", "webhook_cli"),
}


class ServiceCommands(AppGroup):
    """``app.cli`` of a service process: each service command imported when looked up."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None and cmd_name in SERVICE_COMMANDS:
            module, attribute = SERVICE_COMMANDS[cmd_name]
            found = getattr(importlib.import_module(module), attribute)
            self.add_command(found, cmd_name)
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(SERVICE_COMMANDS))

