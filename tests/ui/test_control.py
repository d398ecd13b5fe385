"""The Delivery control page (/ui/control, API.md §16): policies with their live state, the
suppression list, rules with live hit counts; admin actions only for admin keys; axe-core,
keyboard and 390 px. Everything is checked against the API the page is a client of."""

from __future__ import annotations

import calendar
import time
from typing import Any

import pytest

from tests.ui.conftest import PHONE
from tests.ui.stack import DEFER_DOMAIN, wait_for
from tests.ui.test_accessibility import axe_violations
from tests.ui.test_journeys import send_test, state_of


def cell_text(page: Any, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


def test_policies_are_listed_with_the_live_state_of_their_destinations(servers, open_page):
    main = servers.main
    # A default policy whose limits never bind: the relay destination then has rate counters,
    # an hour's too, so it stays in the state past the end of the minute it was sent in.
    policy = main.api("POST", "/api/policies", key=servers.admin_key,
                      body={"kind": "default", "messages_per_minute": 100000,
                            "messages_per_hour": 1000000, "max_connections": 8})
    try:
        time.sleep(3)  # workers re-read the policies every 2 s (docs/DELIVERY.md)
        sent = send_test(main, servers.sender(), "policy-state@example.net")
        wait_for(lambda: state_of(main, sent) is None)  # delivered
        api_state = wait_for(lambda: main.api("GET", "/api/policies/state")["destinations"])
        page = open_page(main, "/ui/control", key=servers.read_key)
        row = page.locator("tr[data-kind=default]")
        assert "100,000" in row.inner_text() and "8" in row.inner_text()
        assert api_state

        def page_shows_the_api_state() -> bool:
            # The state moves on its own (a window ends, a slot is released) and the page
            # reads it every 10 s: compare the page with the API as it is now, until equal.
            shown = page.locator("#destination-states tbody tr").evaluate_all(
                "rows => rows.map((row) => row.dataset.destination)")
            now = main.api("GET", "/api/policies/state")["destinations"]
            return bool(shown) and sorted(shown) == sorted(d["destination"] for d in now)

        wait_for(page_shows_the_api_state)
    finally:
        main.api("DELETE", f"/api/policies/{policy['id']}", key=servers.admin_key)


def test_suppressions_search_add_and_remove(servers, open_page):
    main = servers.main
    main.api("POST", "/api/suppressions", key=servers.admin_key,
             body={"address": "already@control.test", "reason": "asked by the owner"})
    page = open_page(main, "/ui/control", key=servers.key("ui-suppressor"))
    page.wait_for_selector("tr[data-address='already@control.test']")

    page.get_by_label("Address", exact=True).fill("new-one@control.test")
    page.get_by_label("Reason (optional)").fill("typo trap")
    page.click("#add-suppression")
    page.wait_for_selector("tr[data-address='new-one@control.test']")
    entry = main.api("GET", "/api/suppressions/new-one@control.test")
    assert (entry["reason"], entry["source"], entry["created_by"]) == (
        "typo trap", "operator", "ui-suppressor")

    page.get_by_label("Address", exact=True).fill("new-one@control.test")  # again: a 409
    page.click("#add-suppression")
    page.wait_for_selector("#add-suppression-form .field-error")
    assert "suppressed already" in page.inner_text("#add-suppression-form .field-error")

    page.get_by_label("Address contains").fill("new-one@")
    page.locator("#suppression-search").get_by_role("button", name="Search").click()
    page.wait_for_function(
        "() => document.querySelector('#suppressions-range').textContent === '1–1 of 1'")
    assert page.locator("#suppressions-table tbody tr").count() == 1

    page.click("[data-remove='new-one@control.test']")
    page.locator("dialog[open]").get_by_role("button",
                                             name="Remove new-one@control.test").click()
    page.wait_for_selector("tr[data-address='new-one@control.test']", state="detached")
    assert main.request("GET", "/api/suppressions/new-one@control.test").status == 404

    with page.expect_download() as download:
        page.click("#export-csv")
    with open(download.value.path(), "rb") as saved:
        assert saved.read() == main.request("GET", "/api/suppressions/export",
                                            query={"address": "new-one@"}).body


def test_rules_are_made_with_an_expiry_count_hits_live_and_are_deleted(servers, open_page):
    main = servers.main
    page = open_page(main, "/ui/control", key=servers.key("ui-rule-maker"))
    page.get_by_label("Action").select_option("hold")
    page.get_by_label("Recipient contains").fill("rule-hits@")
    page.get_by_label("Expires after (minutes)").fill("45")
    page.get_by_label("Comment (optional)").fill("reputation check")
    page.click("#create-rule")
    page.wait_for_selector("#rules-table tr[data-action=hold]")
    [rule] = [r for r in main.api("GET", "/api/rules") if r["recipient"] == "rule-hits@"]
    assert rule["created_by"] == "ui-rule-maker" and rule["comment"] == "reputation check"
    made = time.time()
    expires = calendar.timegm(time.strptime(rule["expires_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert 44 * 60 <= expires - made <= 46 * 60

    held = send_test(main, servers.sender(), "rule-hits@example.net")
    assert state_of(main, held) == "held"
    # The page re-reads the rules every 10 s: the hit appears without a reload.
    page.wait_for_function("(id) => document.querySelector(`tr[data-rule='${id}'] td.hits`)"
                           "?.textContent === '1'", arg=rule["id"])

    page.click(f"[data-delete-rule='{rule['id']}']")
    page.locator("dialog[open]").get_by_role("button", name=f"Delete rule {rule['id']}").click()
    page.wait_for_selector(f"tr[data-rule='{rule['id']}']", state="detached")
    assert main.request("GET", f"/api/rules/{rule['id']}").status == 404
    main.api("POST", f"/api/queue/message/{held}/release", key=servers.admin_key)


def test_a_bounce_rule_counts_the_queued_mail_first_and_fails_it(servers, open_page):
    main = servers.main
    key = servers.sender()
    queued = send_test(main, key, f"ui-bounce@{DEFER_DOMAIN}")
    wait_for(lambda: state_of(main, queued) == "deferred")
    page = open_page(main, "/ui/control", key=servers.admin_key)
    page.get_by_label("Action").select_option("bounce")
    page.get_by_label("Recipient contains").fill("ui-bounce@")
    page.get_by_label("Expires after (minutes)").fill("5")
    page.click("#create-rule")
    dialog = page.locator("dialog[open]")
    assert "1 queued message(s) match" in dialog.inner_text()
    dialog.get_by_role("button", name="Cancel").click()
    assert not [r for r in main.api("GET", "/api/rules") if r["recipient"] == "ui-bounce@"]
    assert state_of(main, queued) == "deferred"

    page.click("#create-rule")
    page.locator("dialog[open]").get_by_role("button", name="Create bounce rule").click()
    page.wait_for_selector("#rules-table tr[data-action=bounce] td.queued-matches")
    [rule] = [r for r in main.api("GET", "/api/rules") if r["recipient"] == "ui-bounce@"]
    assert rule["queued_matches"] == 1
    assert cell_text(page, f"tr[data-rule='{rule['id']}'] td.queued-matches") == "1"
    assert state_of(main, queued) == "failed"
    main.api("DELETE", f"/api/rules/{rule['id']}", key=servers.admin_key)


def test_a_read_key_sees_everything_and_changes_nothing(servers, open_page):
    main = servers.main
    page = open_page(main, "/ui/control", key=servers.read_key)
    assert page.locator("#needs-admin").is_visible()
    for selector in ("#create-rule", "#add-suppression", "#import-csv"):
        assert page.get_attribute(selector, "aria-disabled") == "true", selector
    before = main.api("GET", "/api/rules")
    page.get_by_label("Sender contains", exact=True).fill("nobody@")
    page.click("#create-rule", force=True)  # aria-disabled: it says why instead
    page.wait_for_selector("#toasts .toast:has-text('needs an admin key')")
    assert main.api("GET", "/api/rules") == before


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize("role", ["read", "admin"])
def test_the_control_page_has_no_serious_accessibility_violation(servers, open_page, role,
                                                                 theme):
    main = servers.main
    response = main.request("POST", "/api/suppressions", key=servers.admin_key,
                            body={"address": "axe@control.test", "reason": "for the check"})
    assert response.status in (201, 409)  # made by the first run of the test
    key = servers.admin_key if role == "admin" else servers.read_key
    page = open_page(main, "/ui/control", key=key, theme=theme)
    page.wait_for_load_state("networkidle")
    assert axe_violations(page) == []


def test_the_control_page_at_390_px_and_by_keyboard(servers, open_page):
    page = open_page(servers.main, "/ui/control", key=servers.admin_key, viewport=PHONE,
                     theme="dark")
    page.wait_for_load_state("networkidle")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    assert axe_violations(page) == []
    # The rule form by keyboard alone: an empty filter is refused next to its field.
    for _ in range(120):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id === 'create-rule'"):
            break
    else:
        raise AssertionError("Tab never reached the Create rule button")
    page.keyboard.press("Enter")
    page.wait_for_selector("#create-rule-form .field-error")
    assert page.evaluate("() => document.activeElement.name") == "sender"
    assert page.get_attribute("#create-rule-form [name=sender]", "aria-invalid") == "true"
