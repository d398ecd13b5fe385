"""Elemta: a mail transfer agent administered through a REST + WebSocket API."""

from __future__ import annotations

import logging
import os
from typing import Any

from flask import Flask

from . import models  # noqa: F401  (registers the tables on db.metadata)
from .config import load_config, unknown_variables
from .errors import register_error_handlers
from .extensions import Api, db, migrate, sock
from .logging_setup import configure_logging
from .logs.handler import install_database_logging
from .openapi import document_security, openapi_settings
from .version import __version__

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "migrations")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the application, one step per line."""
    app = Flask(__name__, instance_relative_config=True)
    configure(app, config)
    api = init_extensions(app)
    register_error_handlers(app)
    register_hooks(app)
    register_blueprints(app, api)
    register_cli(app)
    return app


# The steps below import the endpoints, the metrics and the commands inside the functions:
# importing any ``app.*`` module (gunicorn.conf.py's log handler, a script) stays light, and
# prometheus_client is imported only in processes that build an application.


def configure(app: Flask, config: dict[str, Any] | None) -> None:
    """Settings, then logging: before anything else logs, every record of the process counts."""
    load_config(app, config)
    configure_logging(app)
    install_database_logging(app)
    for name in unknown_variables(os.environ):
        logging.getLogger("elemta.config").warning(
            "%s is not an Elemta setting and is ignored (misspelt?)", name)
    app.config.update(openapi_settings(__version__))
    app.json.sort_keys = False  # keep the contract's field order (error, code, details)


def init_extensions(app: Flask) -> Api:
    """The database, migrations, the OpenAPI document (returned) and WebSockets."""
    db.init_app(app)
    # An absolute path: Flask-Migrate would resolve "migrations" against the current directory.
    migrate.init_app(app, db, directory=MIGRATIONS_DIR)
    # One Api per application (not a module singleton): each app owns its OpenAPI document.
    api = Api(app, spec_kwargs={"info": {"description": "Elemta mail transfer agent API"}})
    document_security(api)
    sock.init_app(app)
    return api


def register_hooks(app: Flask) -> None:
    """Every request hook, in the order they must run.

    before_request hooks run in this order, after_request hooks in reverse: request id, size
    and input checks and CORS preflight first (a preflight carries no credentials and costs
    nothing); then the caller of a previous request is forgotten; then the rate limiter (before
    the auth check, so refused credentials are rate limited too); then the auth check; the
    request timer last, so it times what the view does.
    """
    from .auth.guard import forget_caller, init_auth
    from .http import register_request_hooks
    from .metrics import init_metrics
    from .ratelimit import init_ratelimit

    register_request_hooks(app)
    app.before_request(forget_caller)
    init_ratelimit(app)
    init_auth(app)
    init_metrics(app)


def register_blueprints(app: Flask, api: Api) -> None:
    """Every endpoint, in the order of the OpenAPI document."""
    from .auth.routes import blp as auth
    from .dkim.routes import blp as dkim
    from .domains.routes import blp as domains
    from .health.routes import blp as health
    from .logs.routes import blp as logs
    from .mail.routes import blp as mail
    from .metrics import metrics_view
    from .openapi import assets, document_metrics
    from .queue.routes import blp as queue
    from .stats.routes import blp as stats
    from .stream.routes import blp as stream
    from .ui import blp as ui

    app.register_blueprint(assets)  # the Swagger UI's files: served, not documented
    if app.config["UI"]:  # the dashboard (docs/DASHBOARD.md): pages, not API; not documented
        app.register_blueprint(ui)
    for blueprint in (auth, queue, mail, dkim, domains, stats, logs, health, stream):
        api.register_blueprint(blueprint)
    # Prometheus text, not JSON: a plain route, described in the document by hand.
    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])
    document_metrics(app, api)


def register_cli(app: Flask) -> None:
    """Every ``flask`` command group."""
    from .auth.cli import apikey_cli
    from .delivery.cli import worker_cmd
    from .demo.cli import demo_cli
    from .dkim.cli import dkim_cli
    from .domains.cli import domain_cli
    from .logs.cli import logs_cli
    from .queue.cli import queue_cli
    from .smtpd.cli import smtpd_cmd
    from .stats.cli import stats_cli

    for group in (queue_cli, demo_cli, worker_cmd, smtpd_cmd, stats_cli, logs_cli, apikey_cli,
                  dkim_cli, domain_cli):
        app.cli.add_command(group)
