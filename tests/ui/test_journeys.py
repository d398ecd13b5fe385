"""The journeys of docs/DASHBOARD.md section 5, in a real Chromium, asserting on the DOM and
on the API (never on pixels)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.ui.conftest import PHONE, Servers, wait_live
from tests.ui.stack import DEFER_DOMAIN, HOSTILE, SLOW_DOMAIN, Stack, wait_for

pytestmark = pytest.mark.slow
BUCKETS = {"hour": 24, "day": 30, "week": 12, "month": 12}


def tile_counts(page: Any) -> dict[str, int]:
    return page.evaluate("""() => Object.fromEntries(
        [...document.querySelectorAll('#queue-tiles a')]
        .map(a => [a.dataset.state, Number(a.querySelector('.tile-count').dataset.count)]))""")


def send_test(stack: Stack, key: str, to: str, subject: str = "Test Email") -> str:
    return stack.api("POST", "/api/send-test", key=key,
                     body={"from": "ops@example.com", "to": to, "subject": subject})["message_id"]


def state_of(stack: Stack, message_id: str) -> str | None:
    response = stack.request("GET", f"/api/queue/message/{message_id}")
    return response.json()["queue"] if response.status == 200 else None


def events_of(stack: Stack, message_id: str, event_type: str | None = None) -> list[dict]:
    return stack.api("GET", "/api/logs/messages",
                     query={"message_id": message_id, "event_type": event_type})["logs"]


def fill_send_test(page: Any, to: str) -> None:
    dialog = page.locator("dialog[open]")
    dialog.get_by_label("From").fill("ops@example.com")
    dialog.get_by_label("To").fill(to)
    dialog.get_by_role("button", name="Send", exact=True).click()


def deferred_messages(servers: Servers, count: int, label: str) -> list[str]:
    """Messages the sink defers (451): they stay deferred for the 120 s retry interval."""
    key = servers.sender()
    ids = [send_test(servers.main, key, f"{label}{n}@{DEFER_DOMAIN}", f"{label} {n}")
           for n in range(count)]
    wait_for(lambda: all(state_of(servers.main, i) == "deferred" for i in ids))
    return ids


# 1 ------------------------------------------------------------------------------------------
def test_anonymous_overview_shows_the_api_figures_and_a_bar_per_bucket(servers, open_page):
    page = open_page(servers.main, "/ui/")
    wait_live(page)
    wait_for(lambda: tile_counts(page) == servers.main.api("GET", "/api/queue/stats"))
    for scale, buckets in BUCKETS.items():
        def chart_matches_api(scale: str = scale) -> bool:
            page.check(f"input[name=timeScale][value={scale}]")
            page.wait_for_selector(f"svg.chart[data-scale={scale}]")
            stats = servers.main.api("GET", "/api/stats/delivery", query={"timeScale": scale})
            sums = page.evaluate("""() => Object.fromEntries(
                ['delivered', 'failed', 'deferred'].map(o =>
                [o, [...document.querySelectorAll(`svg.chart rect.bar.${o}`)]
                    .reduce((s, r) => s + Number(r.dataset.value), 0)]))""")
            return sums == {o: stats[f"total_{o}"] for o in ("delivered", "failed", "deferred")}
        # The worker may still be delivering the seeded mail that was due when the page loaded:
        # the page refreshes its chart on outcomes, at most every 30 s (CHART_REFRESH_MS).
        wait_for(chart_matches_api, timeout=45)
        assert page.locator("svg.chart g.bucket").count() == buckets
        assert page.locator("svg.chart rect.bar").count() == 3 * buckets
        assert page.locator("svg.chart g.bucket.partial").count() == 1
        starts = page.eval_on_selector_all("svg.chart g.bucket",
                                           "gs => gs.map(g => g.dataset.start)")
        assert starts == sorted(starts)  # oldest to newest
        assert page.get_attribute("svg.chart", "role") == "img"
    page.click("#table-toggle")
    assert page.locator("#delivery-table tbody tr").count() == BUCKETS["month"]
    assert "no outcomes" in page.inner_text("#delivery-totals") or "%" in page.inner_text(
        "#delivery-totals")


# 2 ------------------------------------------------------------------------------------------
def test_send_test_shows_pending_then_delivered_without_reload(servers, open_page):
    page = open_page(servers.main, "/ui/", key=servers.admin_key)
    wait_live(page)
    page.click("#send-test")
    fill_send_test(page, f"j2@{SLOW_DOMAIN}")
    toast = page.wait_for_selector("#toasts >> text=/Test message msg-/")
    message_id = re.search(r"msg-[A-Za-z0-9_-]+", toast.inner_text()).group(0)
    # The sink holds the message for a few seconds: it is pending meanwhile, then delivered.
    page.wait_for_selector(f"#recent-events li[data-message-id='{message_id}'][data-action=queued]")
    page.wait_for_function("() => Number(document.querySelector("
                           "'[data-state=pending] .tile-count').dataset.count) >= 1")
    page.wait_for_selector(
        f"#recent-events li[data-message-id='{message_id}'][data-action=delivered]",
        timeout=30000)
    assert f"j2@{SLOW_DOMAIN}" in servers.sink.received
    assert page.evaluate("() => performance.getEntriesByType('navigation').length") == 1


# 3 ------------------------------------------------------------------------------------------
def test_sign_in_refuses_a_bad_key_read_key_disables_admin_controls_sign_out(servers, open_page):
    page = open_page(servers.main, "/ui/")
    assert page.inner_text("#session-who") == "Not signed in"
    page.click("#sign-in")
    page.fill("#api-key-input", "elemta_not-a-real-key")
    page.click("dialog .sign-in-form button[type=submit]")
    error = page.wait_for_selector("dialog .field-error")
    assert "Invalid, revoked or expired API key" in error.inner_text()
    assert page.get_attribute("#api-key-input", "aria-invalid") == "true"
    assert page.evaluate("() => sessionStorage.getItem('elemta.key')") is None
    page.fill("#api-key-input", servers.read_key)
    with page.expect_navigation():
        page.click("dialog .sign-in-form button[type=submit]")
    page.wait_for_selector("#session-who .key-name")
    assert page.inner_text("#session-who .key-name") == "ui-reader"
    assert "read" in page.inner_text("#session-who")
    for control in ("#retry-all-deferred", "#send-test"):
        assert page.get_attribute(control, "aria-disabled") == "true"
    assert "Needs an admin key" in page.get_attribute("#retry-all-deferred", "title")
    page.click("#retry-all-deferred", force=True)  # does nothing but say why
    assert page.locator("dialog[open]").count() == 0
    with page.expect_navigation():
        page.click("#sign-out")
    page.wait_for_selector("#sign-in")
    assert page.evaluate("() => sessionStorage.length") == 0


# 4 ------------------------------------------------------------------------------------------
def test_filter_and_page_to_the_end_counts_every_message_once(servers, open_page):
    page = open_page(servers.main, "/ui/queue?state=failed")
    page.get_by_label("Sender contains").fill("example")
    page.get_by_label("Page size").select_option("25")
    with page.expect_navigation():
        page.get_by_role("button", name="Apply filters").click()
    assert "sender=example" in page.url and "limit=25" in page.url
    page.wait_for_selector("#queue-range[data-total]")
    listing = servers.main.request("GET", "/api/queue/failed",
                                   query={"sender": "example", "limit": 25})
    total = int(listing.headers["X-Total-Count"])
    assert total > 25
    seen: list[str] = []
    while True:
        page.wait_for_selector("#queue-table tbody tr")
        seen += page.eval_on_selector_all("#queue-table tbody tr[data-id]",
                                          "rows => rows.map(r => r.dataset.id)")
        if page.is_disabled("#page-next"):
            break
        first = seen[-1]
        page.click("#page-next")
        page.wait_for_selector(f"tr[data-id='{first}']", state="detached")
    assert len(seen) == total == int(page.get_attribute("#queue-range", "data-total"))
    assert len(set(seen)) == len(seen)
    assert page.inner_text("#queue-range").endswith(f"of {total}")
    pages = -(-total // 25)
    page.click("#page-prev")
    page.wait_for_selector(f"#queue-range >> text=/^{(pages - 2) * 25 + 1}–{(pages - 1) * 25} of/")


# 5 ------------------------------------------------------------------------------------------
def test_bulk_retry_counts_first_cancel_changes_nothing_confirm_names_the_key(servers,
                                                                              open_page):
    key = servers.key("bulk-operator")
    ids = deferred_messages(servers, 3, "bulk")
    page = open_page(servers.main, f"/ui/queue?state=deferred&domain={DEFER_DOMAIN}", key=key)
    page.click("[data-bulk=retry]")
    dialog = page.wait_for_selector("dialog.bulk-dialog[open]")
    expected = servers.main.api("POST", "/api/queue/deferred/retry", key=servers.sender(),
                                query={"domain": DEFER_DOMAIN, "dry_run": "true"})["count"]
    assert int(page.get_attribute(".bulk-count", "data-count")) == expected >= 3
    assert page.inner_text(".cli-flask") == (
        f"flask queue retry --queue deferred --domain {DEFER_DOMAIN}")
    assert f"/api/queue/deferred/retry?domain={DEFER_DOMAIN}" in page.inner_text(".cli-curl")
    assert DEFER_DOMAIN in dialog.inner_text()
    page.locator("dialog[open]").get_by_role("button", name="Cancel").click()
    assert page.locator("dialog[open]").count() == 0
    assert all(not events_of(servers.main, i, "system") for i in ids)
    page.click("[data-bulk=retry]")
    page.wait_for_selector("dialog.bulk-dialog[open]")
    page.click("dialog button.confirm")
    page.wait_for_selector("#toasts >> text=/retried/")
    for message_id in ids:
        system = wait_for(lambda m=message_id: events_of(servers.main, m, "system"))
        assert system[0]["message"] == f"Message {message_id} retried by bulk-operator"


# 6 ------------------------------------------------------------------------------------------
def test_hold_selected_messages_then_release_them(servers, open_page):
    ids = deferred_messages(servers, 2, "hold")
    page = open_page(servers.main, f"/ui/queue?state=deferred&domain={DEFER_DOMAIN}",
                     key=servers.admin_key)
    for message_id in ids:
        page.check(f"input.select-row[value='{message_id}']")
    page.click("#selection-actions [data-action=hold]")
    page.wait_for_selector("#selection-progress >> text='Hold: 2 of 2 done.'")
    assert [state_of(servers.main, i) for i in ids] == ["held", "held"]
    page.goto(f"{servers.main.base_url}/ui/queue?state=held&domain={DEFER_DOMAIN}")
    for message_id in ids:
        page.check(f"input.select-row[value='{message_id}']")
    page.click("#selection-actions [data-action=release]")
    page.wait_for_selector("#selection-progress >> text='Release: 2 of 2 done.'")
    assert all(state_of(servers.main, i) in ("pending", "deferred") for i in ids)
    actors = [e["message"] for i in ids for e in events_of(servers.main, i, "system")]
    assert sorted(actors) == sorted([f"Message {i} {verb} by ui-admin" for i in ids
                                     for verb in ("held", "released")])


# 7 ------------------------------------------------------------------------------------------
def test_message_raw_equals_format_raw_and_history_follows_delete(servers, open_page):
    (message_id,) = deferred_messages(servers, 1, "raw")
    page = open_page(servers.main, f"/ui/message/{message_id}", key=servers.admin_key)
    raw = servers.main.request("GET", f"/api/queue/message/{message_id}",
                               query={"format": "raw"}).body.decode()
    # open_page returns once the shell is drawn; the message itself arrives after two requests.
    page.wait_for_selector("#raw-message")
    assert page.eval_on_selector("#raw-message", "e => e.textContent") == raw
    assert "tempfail" in page.inner_text("table.timeline")
    page.click("#message-actions [data-action=delete]")
    page.locator("dialog[open]").get_by_role("button", name="Delete", exact=True).click()
    page.wait_for_selector("#message-gone")
    history = page.eval_on_selector_all("table.timeline tbody tr",
                                        "rows => rows.map(r => r.dataset.eventType)")
    assert {"reception", "tempfail", "system"} <= set(history)
    assert f"Message {message_id} deleted by ui-admin" in page.inner_text("table.timeline")
    assert state_of(servers.main, message_id) is None


# 8 ------------------------------------------------------------------------------------------
def test_logs_level_filter_live_rows_and_offline_leaves_no_gap(servers, open_page):
    page = open_page(servers.main, "/ui/logs?level=error")
    levels = page.eval_on_selector_all("#logs-table tbody tr[data-level]",
                                       "rows => rows.map(r => r.dataset.level)")
    assert set(levels) <= {"error", "fatal"}
    assert page.input_value("select[name=level]") == "error"

    page = open_page(servers.main, "/ui/logs")
    wait_live(page)
    servers.main.api("POST", "/api/auth/keys", key=servers.admin_key,
                     body={"name": "logs-live", "role": "read"})
    page.wait_for_selector("#logs-table td >> text='API key logs-live created (role read)'")

    page.context.set_offline(True)
    page.wait_for_selector("#live-status[data-state=offline]")
    names = [f"logs-offline-{n}" for n in range(3)]
    for name in names:
        servers.main.api("POST", "/api/auth/keys", key=servers.admin_key,
                         body={"name": name, "role": "read"})
    page.context.set_offline(False)
    for name in names:
        page.wait_for_selector(f"#logs-table td >> text='API key {name} created (role read)'")
    shown = page.eval_on_selector_all("#logs-table tbody tr[data-id]",
                                      "rows => rows.map(r => Number(r.dataset.id))")
    assert len(shown) == len(set(shown)), "a record was shown twice"
    stored = {r["id"] for r in servers.main.api("GET", "/api/logs", query={"limit": 1000})["logs"]
              if min(shown) <= r["id"] <= max(shown)}
    assert stored == set(shown), "a record between the first and the last shown is missing"


# 9 ------------------------------------------------------------------------------------------
def test_new_key_is_shown_once_and_revoking_the_key_in_use_signs_out(servers, open_page):
    own = servers.key("keys-operator")
    page = open_page(servers.main, "/ui/keys", key=own)
    page.get_by_label("Name").fill("made-in-ui")
    page.get_by_label("Role").select_option("read")
    page.click("#create-key")
    new_key = page.inner_text("#new-key-value")
    assert new_key.startswith("elemta_")
    assert servers.main.api("GET", "/api/auth/me", key=new_key)["name"] == "made-in-ui"
    page.click("#key-done")
    assert new_key not in page.content()
    page.reload()
    page.wait_for_selector("tr[data-name=made-in-ui]")
    assert new_key not in page.content()
    page.click("[data-revoke=keys-operator]")
    page.wait_for_selector("#own-key-warning")
    page.locator("dialog[open]").get_by_role("button", name="Revoke keys-operator").click()
    page.wait_for_selector("dialog.sign-in[open]")
    assert page.evaluate("() => sessionStorage.getItem('elemta.key')") is None
    assert "Not signed in" in page.inner_text("#session-who")
    assert servers.main.request("GET", "/api/auth/me", key=own).status == 401


# 10 -----------------------------------------------------------------------------------------
def test_health_is_degraded_without_a_worker_and_healthy_with_one(servers, open_page):
    page = open_page(servers.locked, "/ui/health", key=servers.locked_read_key)
    assert page.inner_text("#health-word") == "degraded"
    assert "absent" in page.inner_text("#health-facts")
    page = open_page(servers.main, "/ui/health")
    wait_for(lambda: servers.main.api("GET", "/api/health")["status"] == "healthy")
    page.reload()
    page.wait_for_selector("#health-word")
    assert page.inner_text("#health-word") == "healthy"
    assert page.get_attribute("a[href='/metrics']", "href") == "/metrics"


# 11 -----------------------------------------------------------------------------------------
def test_auth_mode_all_asks_for_a_key_first_then_streams(servers, open_page):
    locked = servers.locked
    page = open_page(locked, "/ui/")
    page.wait_for_selector("dialog.sign-in[open]")
    assert page.locator("#queue-tiles").count() == 0
    page.fill("#api-key-input", servers.locked_read_key)
    with page.expect_navigation():
        page.click("dialog .sign-in-form button[type=submit]")
    wait_live(page)
    before = tile_counts(page)
    assert before == locked.api("GET", "/api/queue/stats", key=servers.locked_read_key)
    send_test(locked, servers.locked_admin_key, "someone@example.net")  # no worker: stays pending
    page.wait_for_function("() => Number(document.querySelector("
                           "'[data-state=pending] .tile-count').dataset.count) === "
                           f"{before['pending'] + 1}")


# 12 -----------------------------------------------------------------------------------------
def test_hostile_content_renders_as_text(servers, open_page):
    message_id = send_test(servers.main, servers.sender(), f"evil@{DEFER_DOMAIN}", HOSTILE)
    wait_for(lambda: state_of(servers.main, message_id) == "deferred")
    page = open_page(servers.main, f"/ui/queue?state=deferred&domain={DEFER_DOMAIN}")
    row = page.wait_for_selector(f"tr[data-id='{message_id}']")
    assert row.eval_on_selector("td.subject", "e => e.textContent") == HOSTILE
    assert HOSTILE in row.eval_on_selector("td.error-text", "e => e.textContent")
    assert page.locator("main img").count() == 0
    page = open_page(servers.main, f"/ui/message/{message_id}")
    # open_page returns once the shell is drawn; the message itself arrives after two requests.
    page.wait_for_selector("#raw-message")
    assert page.locator("main img").count() == 0
    assert HOSTILE in page.eval_on_selector("#raw-message", "e => e.textContent")
    # The watch of open_page fails the test on any dialog, script error or CSP violation.


# 13 -----------------------------------------------------------------------------------------
def test_no_page_requests_another_host(servers, open_page):
    message_id = servers.main.api("GET", "/api/queue/all", query={"limit": 1})[0]["id"]
    paths = ["/ui/", "/ui/queue", f"/ui/message/{message_id}", "/ui/logs?view=events",
             "/ui/keys", "/ui/health"]
    for path in paths:
        page = open_page(servers.main, path, key=servers.admin_key, viewport=PHONE)
        page.wait_for_load_state("networkidle")
        watch = open_page.last_watch
        assert watch.requests and not watch.foreign
        assert any("/ui/assets/" in url for url in watch.requests)
    # A request to another host never leaves the page: the CSP refuses it before the network.
    assert page.evaluate("() => fetch('http://192.0.2.1/probe').then(() => 'sent', () => 'refused')"
                         ) == "refused"
    blocked = page.evaluate("() => window.__cspViolations.splice(0)")
    assert blocked == ["connect-src http://192.0.2.1/probe"]


# 15 -----------------------------------------------------------------------------------------
def test_rate_limit_shows_the_wait(servers, open_page):
    key = servers.key("limit-operator", "admin", stack=servers.locked)  # a budget of its own
    page = open_page(servers.locked, "/ui/", key=key)
    for n in range(3):
        page.click("#send-test")
        fill_send_test(page, f"limit{n}@example.net")
        if n < 2:
            page.wait_for_selector("dialog[open]", state="detached")
    error = page.wait_for_selector("dialog .error-box[data-status='429']")
    assert re.search(r"Rate limited: .*Try again in \d+ s\.", error.inner_text())
    assert "Request ID" in error.inner_text()


# Live fallback (DASHBOARD.md section 1) ----------------------------------------------------
def test_refused_streams_fall_back_to_polling_and_say_so(servers, open_page):
    page = open_page(servers.main, "/ui/queue")
    wait_live(page)
    # From now on every stream connection is closed at once, as by a proxy that drops them.
    page.route_web_socket(re.compile(r".*/api/queue/ws.*"), lambda ws: ws.close())
    page.reload()
    status = page.wait_for_selector("#live-status[data-state=polling]", timeout=60000)
    assert status.inner_text() == "Live updates unavailable: polling every 10 s"
    assert page.locator("#toasts >> text='Live updates unavailable: polling every 10 s'").count()

    def counts_from_polling() -> bool:  # polled every 10 s while the worker moves mail
        stats = servers.main.api("GET", "/api/queue/stats")
        shown = page.eval_on_selector_all("nav.tabs .tab-count", "s => s.map(e => e.textContent)")
        return shown == [f"({stats[s]})" for s in ("total", "pending", "deferred", "held",
                                                   "failed")]
    wait_for(counts_from_polling, timeout=45)
