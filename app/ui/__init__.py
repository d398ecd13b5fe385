"""The web dashboard at ``/ui`` (docs/DASHBOARD.md): a static shell plus vanilla ES modules.

Nothing here reads the database: every page is a client of the documented JSON API and its two
WebSocket streams, with the API key the user signs in with, so the UI can do nothing that curl
cannot, and every action is authorised and recorded like any other API call. The shell is the
same HTML for every page (the page name and the version are its only variables); the assets are
served under a content hash, so a browser may cache them for good.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from flask import Blueprint, Response, abort, current_app, render_template, send_from_directory

from ..version import __version__

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

# DASHBOARD.md section 1. 'self' covers the same host's ws:// and wss:// (CSP level 3);
# require-trusted-types-for makes any string-to-HTML sink (innerHTML, ...) throw, so a value
# from the API can only ever reach the page as text.
CONTENT_SECURITY_POLICY = ("default-src 'self'; object-src 'none'; base-uri 'none'; "
                           "frame-ancestors 'none'; form-action 'self'; "
                           "require-trusted-types-for 'script'")
SHELL_CACHE = "no-cache"
ASSET_CACHE = "public, max-age=31536000, immutable"

# page name -> (title, URL rule); the shell's nav lists them in this order.
PAGES = {
    "overview": ("Overview", "/"),
    "queue": ("Queue", "/queue"),
    "control": ("Delivery control", "/control"),
    "message": ("Message", "/message/<string:message_id>"),
    "logs": ("Logs", "/logs"),
    "keys": ("API keys", "/keys"),
    "health": ("Health", "/health"),
}
NAV = ("overview", "queue", "control", "logs", "keys", "health")

blp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates")


def assets_version(directory: str = STATIC_DIR) -> str:
    """A hash over every asset's path and bytes: it changes whenever any asset changes."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def _shell(page: str, **_params: Any) -> Response:
    version = current_app.config["UI_ASSETS_VERSION"]
    html = render_template("ui/shell.html", page=page, title=PAGES[page][0], nav=NAV,
                           pages=PAGES, version=__version__, assets=version)
    response = Response(html, mimetype="text/html")
    response.headers["Cache-Control"] = SHELL_CACHE
    return response


def _page_view(page: str) -> Any:
    def view(**params: Any) -> Response:
        return _shell(page, **params)

    view.__name__ = f"page_{page}"
    return view


for _name, (_title, _rule) in PAGES.items():
    blp.add_url_rule(_rule, endpoint=_name, view_func=_page_view(_name), methods=["GET"])


@blp.get("/assets/<string:version>/<path:filename>")
def asset(version: str, filename: str) -> Response:
    """A static asset; cached for good under the current version, revalidated under another."""
    if not filename.endswith((".js", ".css", ".svg")):
        abort(404)
    response = send_from_directory(STATIC_DIR, filename)
    current = version == current_app.config["UI_ASSETS_VERSION"]
    response.headers["Cache-Control"] = ASSET_CACHE if current else SHELL_CACHE
    return response


@blp.after_request
def _lock_down(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


@blp.record_once
def _remember_assets_version(state: Any) -> None:
    """Hash the assets once per application, when the blueprint is registered
    (``create_app`` registers it unless ELEMTA_UI is off; /ui then answers 404 like any unknown
    URL). /ui redirects to /ui/ (werkzeug's strict slashes)."""
    state.app.config["UI_ASSETS_VERSION"] = assets_version()
