"""WSGI entry point: ``gunicorn wsgi:app`` and the ``flask`` CLI (found here by default)."""

import logging
import os
import sys

from app import create_app, serves_http
from app.config import ConfigError


def _serve_http() -> bool:
    """gunicorn and everything else: the whole application. The ``flask`` command running a
    process that answers no HTTP request (``flask worker``, ...): without its HTTP side, which
    would only slow its start (``create_app``)."""
    program = sys.argv[0]
    if not (os.path.basename(program) == "flask"
            or program.endswith(os.path.join("flask", "__main__.py"))):
        return True
    return serves_http(sys.argv[1:])


try:
    app = create_app(serve_http=_serve_http())
except ConfigError as exc:
    # A refused setting is the operator's typo, not a bug: one line naming it, no traceback.
    if "gunicorn" in sys.modules:
        # gunicorn prints an AppImportError as one line and halts the master ("App failed to
        # load", exit 4) instead of booting replacement workers forever.
        from gunicorn.errors import AppImportError

        # Also into the JSON log stream (gunicorn.conf.py routes gunicorn.error there).
        logging.getLogger("gunicorn.error").error("configuration refused: %s", exc)
        raise AppImportError(f"Error: {exc}") from None
    # The flask CLI imports this module inside click: exit before any command runs. Status 2,
    # click's own for a bad invocation, tells a refused configuration from a failed command.
    print(f"Error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
