"""WCAG 2.2 AA (docs/DASHBOARD.md section 4): axe-core on every page, for a read key and an
admin key, in the light and the dark theme, at desktop width; and the bulk dialog by keyboard
alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.ui.conftest import PHONE, wait_live
from tests.ui.stack import DEFER_DOMAIN, wait_for

pytestmark = pytest.mark.slow

AXE_SOURCE = (Path(__file__).parent / "vendor" / "axe.min.js").read_text()
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]
PAGES = ["/ui/", "/ui/queue?state=deferred&limit=25", "/ui/message/{message_id}", "/ui/logs",
         "/ui/logs?view=events", "/ui/keys", "/ui/health"]


def axe_violations(page: Any) -> list[dict]:
    """axe's serious and critical violations on the page as it is now."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(AXE_SOURCE)
    result = page.evaluate("""async (tags) => {
        const r = await axe.run(document, {runOnly: {type: 'tag', values: tags}});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.slice(0, 5).map(n => n.target.join(' ') + ': ' + n.failureSummary)}));
    }""", AXE_TAGS)
    return [v for v in result if v["impact"] in ("serious", "critical")]


@pytest.fixture(scope="module")
def message_id(servers) -> str:
    return servers.main.api("GET", "/api/queue/deferred", query={"limit": 1})[0]["id"]


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize("role", ["read", "admin"])
def test_every_page_has_no_serious_accessibility_violation(servers, open_page, message_id,
                                                           role, theme):
    key = servers.admin_key if role == "admin" else servers.read_key
    failures = {}
    page = None
    for path in PAGES:
        url = path.format(message_id=message_id)
        if page is None:
            page = open_page(servers.main, url, key=key, theme=theme)
        else:
            page.goto(servers.main.base_url + url)
        page.wait_for_load_state("networkidle")
        found = axe_violations(page)
        if path == "/ui/":
            assert page.evaluate("() => matchMedia('(prefers-color-scheme: dark)').matches") == (
                theme == "dark")
            page.click("#table-toggle")  # the chart's table alternative too
            found += axe_violations(page)
        if found:
            failures[path] = found
    assert not failures, failures


def test_dialogs_and_phone_width_have_no_serious_accessibility_violation(servers, open_page):
    page = open_page(servers.main, "/ui/queue?state=deferred", key=servers.admin_key,
                     viewport=PHONE, theme="dark")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    assert axe_violations(page) == []
    page.click("[data-bulk=retry]")
    page.wait_for_selector("dialog.bulk-dialog[open] .type-count")  # over 100: type the count
    assert axe_violations(page) == []


def test_bulk_dialog_works_by_keyboard_alone(servers, open_page):
    sender = servers.sender()
    ids = [servers.main.api("POST", "/api/send-test", key=sender,
                            body={"from": "ops@example.com", "to": f"kbd{n}@{DEFER_DOMAIN}"})
           ["message_id"] for n in range(2)]
    wait_for(lambda: all(servers.main.api("GET", f"/api/queue/message/{i}")["queue"] == "deferred"
                         for i in ids))
    page = open_page(servers.main, f"/ui/queue?state=deferred&domain={DEFER_DOMAIN}",
                     key=servers.admin_key)
    wait_live(page)

    def focus_by_tab(selector: str) -> None:
        for _ in range(80):
            page.keyboard.press("Tab")
            if page.evaluate("(s) => document.activeElement.matches(s)", selector):
                return
        raise AssertionError(f"Tab never reached {selector}")

    focus_by_tab("[data-bulk=retry]")
    page.keyboard.press("Enter")
    page.wait_for_selector("dialog.bulk-dialog[open]")
    assert page.evaluate("() => document.activeElement.textContent") == "Cancel"
    page.keyboard.press("Escape")  # closes, and focus returns to the button that opened it
    page.wait_for_selector("dialog[open]", state="detached")
    assert page.evaluate("() => document.activeElement.dataset.bulk") == "retry"
    page.keyboard.press("Enter")
    page.wait_for_selector("dialog.bulk-dialog[open]")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.classList.contains('confirm')")
    page.keyboard.press("Enter")
    page.wait_for_selector("#toasts >> text=/retried/")
    for message_id in ids:
        wait_for(lambda m=message_id: servers.main.api(
            "GET", "/api/logs/messages", query={"message_id": m, "event_type": "system"})["logs"])
