"""The dashboard's server side (app/ui): the shell of every page, its CSP, hashed assets, and
ELEMTA_UI. What the pages do is tested in a real browser (tests/ui/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from app.ui import CONTENT_SECURITY_POLICY, STATIC_DIR

PAGES = ["/ui/", "/ui/queue", "/ui/control", "/ui/message/msg-anything", "/ui/logs", "/ui/keys",
         "/ui/health"]
ASSETS = sorted(p.relative_to(STATIC_DIR).as_posix() for p in Path(STATIC_DIR).rglob("*")
                if p.is_file())


def asset_urls(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/ui/assets/[^"]+)"', html)


@pytest.mark.parametrize("path", PAGES)
def test_every_page_is_the_shell_under_a_strict_csp(anonymous_client, path):
    response = anonymous_client.get(path)
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    csp = response.headers["Content-Security-Policy"]
    assert csp == CONTENT_SECURITY_POLICY
    for directive in ("default-src 'self'", "object-src 'none'", "base-uri 'none'",
                      "frame-ancestors 'none'", "require-trusted-types-for 'script'"):
        assert directive in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-cache"
    html = response.get_data(as_text=True)
    assert "<script>" not in html and " style=" not in html  # nothing inline
    assert re.findall(r'(?:src|href)="(https?:)?//', html) == []  # nothing from elsewhere
    assert len(asset_urls(html)) == 3


def test_pages_are_served_without_a_key_in_auth_mode_all(make_app, app):
    served = make_app(auth_mode="all")
    client = FlaskClient(served, served.response_class)
    shell = client.get("/ui/queue")
    assert shell.status_code == 200
    with client.get(asset_urls(shell.get_data(as_text=True))[-1]) as asset:
        assert asset.status_code == 200
    assert client.get("/api/queue/stats").status_code == 401  # the data still needs the key


def test_assets_are_cached_for_good_under_their_content_hash(anonymous_client):
    html = anonymous_client.get("/ui/").get_data(as_text=True)
    script = next(u for u in asset_urls(html) if u.endswith("/app.js"))
    with anonymous_client.get(script) as response:
        assert response.status_code == 200
        assert response.mimetype in ("text/javascript", "application/javascript")
        assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    # A module imported by app.js, under the same version prefix.
    with anonymous_client.get(script.replace("/app.js", "/pages/queue.js")) as module:
        assert module.status_code == 200
    stale = re.sub(r"/assets/[^/]+/", "/assets/0000000000000000/", script)
    with anonymous_client.get(stale) as old:
        assert old.status_code == 200 and old.headers["Cache-Control"] == "no-cache"
    assert anonymous_client.get(script.replace("app.js", "../__init__.py")).status_code == 404
    assert anonymous_client.get(script.replace("app.js", "nothing.js")).status_code == 404


def test_the_redirect_to_the_overview(anonymous_client):
    response = anonymous_client.get("/ui")
    assert response.status_code == 308 and response.headers["Location"].endswith("/ui/")


def test_ui_off_serves_nothing(make_app, app):
    served = make_app(ui="off")
    client = FlaskClient(served, served.response_class)
    for path in [*PAGES, "/ui/assets/x/app.js"]:
        response = client.get(path)
        assert response.status_code == 404
        assert response.get_json()["code"] == "NOT_FOUND"


@pytest.mark.parametrize("asset", [a for a in ASSETS if a.endswith(".js")])
def test_scripts_write_text_only_and_load_nothing_from_elsewhere(asset):
    """The CSP would stop these at run time; the source does not even try."""
    source = (Path(STATIC_DIR) / asset).read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "setAttribute('style'", "import("):
        assert sink not in source, f"{asset} uses {sink}"
    # The only absolute URL is the SVG namespace, an identifier that is never fetched.
    urls = set(re.findall(r"https?://[^\s'\"`]+", source))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls


def test_the_stylesheet_uses_no_font_or_url_from_elsewhere():
    css = (Path(STATIC_DIR) / "ui.css").read_text()
    assert "@import" not in css and "@font-face" not in css and "url(" not in css
