"""Elemta: a mail transfer agent administered through a REST + WebSocket API."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any, cast

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from . import models  # noqa: F401  (registers the tables on db.metadata)
from .config import load_config, unknown_variables
from .errors import register_error_handlers
from .extensions import db
from .logging_setup import configure_logging
from .logs.handler import install_database_logging
from .version import __version__

if TYPE_CHECKING:
    from .api import Api

# The commands that run a process answering no HTTP request, as typed after ``flask`` or
# ``elemta``: they get the application without its HTTP side (``create_app``'s ``serve_http``).
NO_HTTP_COMMANDS = (("worker",), ("smtpd",), ("webhook", "dispatch"))
# The options of the ``flask`` group that take a value (the value is not a command word).
_GROUP_OPTIONS_WITH_VALUE = ("-A", "--app", "-e", "--env-file")

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "migrations")


class ElemtaFlask(Flask):
    """Flask, minus a per-request cost that buys nothing here.

    Flask asks ``inspect.iscoroutinefunction`` of every hook and view it calls, on every
    request (``ensure_sync``): about 16 times per API request, 5 % of the CPU of
    ``/api/queue/stats`` (docs/PERFORMANCE.md). The answer never changes for a function, so it
    is remembered for the synchronous ones (the hooks and views registered at start; up to
    ``SYNC_CACHE_SIZE`` of them, so functions made per request cannot grow it without bound).
    Coroutine functions still go through Flask's ``async_to_sync`` on every call, as before.
    """

    SYNC_CACHE_SIZE = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._known_sync: dict[Any, bool] = {}

    def ensure_sync(self, func: Any) -> Any:
        try:
            if func in self._known_sync:
                return func
        except TypeError:  # an unhashable callable: Flask's own answer
            return super().ensure_sync(func)
        if iscoroutinefunction(func):
            return self.async_to_sync(func)
        if len(self._known_sync) < self.SYNC_CACHE_SIZE:
            self._known_sync[func] = True
        return func


def create_app(config: dict[str, Any] | None = None, *, serve_http: bool = True) -> Flask:
    """Build the application, one step per line.

    ``serve_http=False`` builds it for a process that answers no HTTP request (``flask worker``,
    ``flask smtpd``, ``flask webhook dispatch``: wsgi.py decides by the command): settings,
    logging, the database and the services' commands, without the endpoints, request hooks,
    error handlers, OpenAPI document, migrations and WebSockets, whose imports and set-up were
    a third of the worker's start-up (docs/PERFORMANCE.md, "Worker start-up").
    """
    app = ElemtaFlask(__name__, instance_relative_config=True)
    configure(app, config)
    db.init_app(app)
    if not serve_http:
        register_services_cli(app)
        return app
    api = init_extensions(app)
    register_error_handlers(app)
    register_hooks(app)
    register_blueprints(app, api)
    register_cli(app)
    return app


def serves_http(argv: Sequence[str]) -> bool:
    """Whether the command line ``argv`` (after ``flask`` or ``elemta``) needs the application's
    HTTP side: yes unless it runs one of ``NO_HTTP_COMMANDS``; in doubt, yes."""
    words: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _GROUP_OPTIONS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            words.append(arg)
        elif words:
            break  # the command's own options: its name is complete
    return not any(tuple(words[:len(command)]) == command for command in NO_HTTP_COMMANDS)


# The steps below import the endpoints, the metrics and the commands inside the functions:
# importing any ``app.*`` module (gunicorn.conf.py's log handler, a script) stays light,
# prometheus_client is imported only in processes that build an application, and the API's
# packages (flask-smorest, Flask-Migrate, flask-sock) only in applications that serve HTTP.


def configure(app: Flask, config: dict[str, Any] | None) -> None:
    """Settings, then logging: before anything else logs, every record of the process counts."""
    load_config(app, config)
    configure_logging(app)
    install_database_logging(app)
    for name in unknown_variables(os.environ):
        logging.getLogger("elemta.config").warning(
            "%s is not an Elemta setting and is ignored (misspelt?)", name)
    # Keep the contract's field order (error, code, details); app.json is Flask's default
    # provider, typed as the JSONProvider base class.
    cast(DefaultJSONProvider, app.json).sort_keys = False
    # No 308 redirect (with an HTML body) from /api//queue to /api/queue: a client that builds
    # URLs wrongly gets the JSON 404, and a POST is never bounced. Set before any rule is added.
    app.url_map.merge_slashes = False


def init_extensions(app: Flask) -> Api:
    """Migrations, the OpenAPI document (returned) and WebSockets."""
    from flask_migrate import Migrate
    from flask_sock import Sock

    from .api import Api
    from .openapi import document_security, openapi_settings

    # An absolute path: Flask-Migrate would resolve "migrations" against the current directory.
    Migrate(app, db, directory=MIGRATIONS_DIR)
    app.config.update(openapi_settings(__version__))
    # One Api per application (not a module singleton): each app owns its OpenAPI document.
    api = Api(app, spec_kwargs={"info": {"description": "Elemta mail transfer agent API"}})
    document_security(api)
    Sock(app)
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
    from .control.routes import policies_blp, rules_blp, suppressions_blp
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
    from .webhooks.routes import blp as webhooks

    app.register_blueprint(assets)  # the Swagger UI's files: served, not documented
    if app.config["UI"]:  # the dashboard (docs/DASHBOARD.md): pages, not API; not documented
        app.register_blueprint(ui)
    for blueprint in (auth, queue, mail, policies_blp, suppressions_blp, rules_blp, dkim, domains,
                      webhooks, stats, logs, health, stream):
        api.register_blueprint(blueprint)
    # Prometheus text, not JSON: a plain route, described in the document by hand.
    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])
    document_metrics(app, api)


def register_services_cli(app: Flask) -> None:
    """The service commands only (worker, smtpd, webhook), each imported when it is looked up
    (app/commands.py): ``flask worker`` imports neither the listener nor the dispatcher, and the
    operator's groups would import marshmallow, dnspython checks and more."""
    from .commands import ServiceCommands

    app.cli = ServiceCommands(name=app.cli.name)


def register_cli(app: Flask) -> None:
    """Every ``flask`` command group."""
    from .auth.cli import apikey_cli
    from .control.cli import policy_cli, rule_cli, suppression_cli
    from .delivery.cli import worker_cmd
    from .demo.cli import demo_cli
    from .dkim.cli import dkim_cli
    from .domains.cli import domain_cli
    from .logs.cli import logs_cli
    from .queue.cli import queue_cli
    from .smtpd.cli import smtpd_cmd
    from .stats.cli import stats_cli
    from .webhooks.cli import webhook_cli

    for group in (queue_cli, demo_cli, worker_cmd, smtpd_cmd, stats_cli, logs_cli, apikey_cli,
                  dkim_cli, domain_cli, policy_cli, suppression_cli, rule_cli,
                  webhook_cli):
        app.cli.add_command(group)
