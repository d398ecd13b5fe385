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
from .http import register_request_hooks
from .logging_setup import configure_logging
from .logs.handler import install_database_logging
from .openapi import document_metrics, openapi_settings, register_docs_assets
from .version import __version__

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "migrations")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the application: config, extensions, blueprints, error handlers, CLI."""
    app = Flask(__name__, instance_relative_config=True)
    load_config(app, config)
    configure_logging(app)
    # Before anything else logs (the auth-mode warning...): every record of the process counts.
    install_database_logging(app)
    for name in unknown_variables(os.environ):
        logging.getLogger("elemta.config").warning(
            "%s is not an Elemta setting and is ignored (misspelt?)", name)
    app.config.update(openapi_settings(__version__))
    app.json.sort_keys = False  # keep the contract's field order (error, code, details)

    db.init_app(app)
    # An absolute path: Flask-Migrate would resolve "migrations" against the current directory.
    migrate.init_app(app, db, directory=MIGRATIONS_DIR)
    # One Api per application (not a module singleton): each app owns its OpenAPI document.
    api = Api(app, spec_kwargs={"info": {"description": "Elemta mail transfer agent API"}})
    sock.init_app(app)
    register_error_handlers(app)
    register_request_hooks(app)
    from .auth import init_app as init_auth_and_limits

    init_auth_and_limits(app, api)
    register_docs_assets(app)

    from .queue.routes import blp as queue_blp

    api.register_blueprint(queue_blp)
    from .mail.routes import blp as mail_blp  # noqa: E402

    api.register_blueprint(mail_blp)
    from .stats.routes import blp as stats_blp

    api.register_blueprint(stats_blp)
    from .logs.routes import blp as logs_blp

    api.register_blueprint(logs_blp)

    from .health.routes import blp as health_blp
    from .metrics import init_metrics

    api.register_blueprint(health_blp)
    init_metrics(app)
    document_metrics(app, api)

    from .stream.routes import blp as stream_blp

    api.register_blueprint(stream_blp)
    from .cli import register_cli

    register_cli(app)
    return app
