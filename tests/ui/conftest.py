"""Browser tests of the dashboard: a real headless Chromium (Debian's ``chromium`` package,
driven by Playwright with ``executable_path``; no browser download) against the production
processes on loopback (tests/ui/stack.py). One server stack per session, not per test.

Every page opened by a test is watched: a request to any other host than the stack's, a
JavaScript error, a CSP violation or a browser dialog (alert, confirm) fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.ui.stack import Sink, Stack, seeded_stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--disable-extensions"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

try:
    from playwright import sync_api
except ImportError:  # pragma: no cover - requirements-dev.txt has it
    sync_api = None

if sync_api is None:
    MISSING = "browser tests need Playwright (pip install -r requirements-dev.txt)"
elif not os.access(CHROMIUM, os.X_OK):
    MISSING = f"browser tests need Chromium: {CHROMIUM} not found (apt-get install chromium)"
else:
    MISSING = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a browser, every test here is skipped, saying why (never silently)."""
    if MISSING is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=MISSING))


# Records CSP violations in the page, from the first script on.
WATCH_SCRIPT = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI);
});
"""


@dataclass
class Servers:
    main: Stack  # auth mode admin, a delivery worker relaying to the sink
    locked: Stack  # auth mode all, strict rate limit 2 per minute, no worker
    sink: Sink
    admin_key: str
    read_key: str
    locked_admin_key: str
    locked_read_key: str
    senders: int = 0

    def key(self, name: str, role: str = "admin", stack: Stack | None = None) -> str:
        """An API key of its own for one test, made with the CLI."""
        return (stack or self.main).create_key(name, role)

    def sender(self) -> str:
        """A fresh admin key for arranging messages: send-test has a strict rate limit per key
        (10 a minute), which the tests of a session together would exceed with one key."""
        self.senders += 1
        return self.main.api("POST", "/api/auth/keys", key=self.admin_key,
                             body={"name": f"arrange-{self.senders}", "role": "admin"})["key"]


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    workdir = tmp_path_factory.mktemp("ui-stack")
    sink = Sink().start()
    started: list[Stack] = []

    def main_stack() -> tuple[Stack, str, str]:
        main = seeded_stack(workdir, "main", sink=sink)
        started.append(main)
        keys = main.create_key("ui-admin", "admin"), main.create_key("ui-reader", "read")
        main.start_worker()
        return main, *keys

    def locked_stack() -> tuple[Stack, str, str]:
        locked = seeded_stack(workdir, "locked", sink=None, messages=40, events=200,
                              ELEMTA_AUTH_MODE="all", ELEMTA_RATELIMIT_STRICT="2 per minute")
        started.append(locked)
        return locked, locked.create_key("locked-admin", "admin"), locked.create_key(
            "locked-reader", "read")

    try:
        # The two stacks are independent: set them up side by side (mostly CLI start-up time).
        with ThreadPoolExecutor(2) as pool:
            main_job, locked_job = pool.submit(main_stack), pool.submit(locked_stack)
            (main, admin, read), (locked, locked_admin, locked_read) = (
                main_job.result(), locked_job.result())
        yield Servers(main, locked, sink, admin, read, locked_admin, locked_read)
    finally:
        for stack in started:
            stack.stop()
        sink.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        # launch() gives every run a fresh, temporary user-data-dir.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS,
                                              headless=True)
        yield chromium
        chromium.close()


@dataclass
class Watch:
    """What a page did that it must not: other hosts, errors, CSP violations, dialogs."""

    origin: str
    requests: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    pages: list[Any] = field(default_factory=list)

    def check(self) -> None:
        violations = []
        for page in self.pages:
            if not page.is_closed():
                violations += page.evaluate("() => window.__cspViolations || []")
        assert not self.foreign, f"requests to other hosts: {self.foreign}"
        assert not self.errors, f"JavaScript errors: {self.errors}"
        assert not self.dialogs, f"browser dialogs: {self.dialogs}"
        assert not violations, f"CSP violations: {violations}"


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    """open_page(stack, path, key=None, theme='light', viewport=DESKTOP) -> (page, watch)."""
    contexts = []
    watches: list[Watch] = []

    def factory(stack: Stack, path: str = "/ui/", *, key: str | None = None,
                theme: str = "light", viewport: dict[str, int] | None = None) -> Any:
        context = browser.new_context(viewport=viewport or DESKTOP, color_scheme=theme,
                                      reduced_motion="reduce", service_workers="block")
        contexts.append(context)
        watch = Watch(stack.base_url)
        watches.append(watch)
        own = urlsplit(stack.base_url).netloc

        def guard(route: Any) -> None:
            url = route.request.url
            watch.requests.append(url)
            if urlsplit(url).netloc != own:
                watch.foreign.append(url)
                route.abort("blockedbyclient")
                return
            route.continue_()

        context.route("**/*", guard)
        context.add_init_script(WATCH_SCRIPT)
        if key:
            # Signed in once, as the sign-in dialog would leave it (later reloads keep it,
            # sign-out and a refused key remove it).
            context.add_init_script(
                "if (!sessionStorage.getItem('elemta.test-seeded')) {"
                " sessionStorage.setItem('elemta.test-seeded', '1');"
                f" sessionStorage.setItem('elemta.key', {json.dumps(key)}); }}")
        page = context.new_page()
        watch.pages.append(page)
        page.on("pageerror", lambda error: watch.errors.append(str(error)))
        page.on("dialog", lambda dialog: (watch.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("websocket", lambda ws: watch.foreign.append(ws.url)
                if urlsplit(ws.url).netloc != own else watch.requests.append(ws.url))
        page.goto(stack.base_url + path)
        # Functions, not expressions: Playwright evaluates expressions with eval(), which the
        # page's CSP refuses (no 'unsafe-eval').
        page.wait_for_function("() => !document.querySelector('#page > p.muted')"
                               " || document.querySelector('dialog[open]')")
        factory.last_watch = watch
        return page

    yield factory
    try:
        for watch in watches:
            watch.check()
    finally:
        for context in contexts:
            context.close()


def wait_live(page: Any) -> None:
    """Until the page's WebSocket streams are open."""
    page.wait_for_selector("#live-status[data-state='live']")
