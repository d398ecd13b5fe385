"""WSGI entry point: ``gunicorn wsgi:app`` and the ``flask`` CLI (found here by default)."""

import logging
import sys

from app import create_app
from app.config import ConfigError

try:
    app = create_app()
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
