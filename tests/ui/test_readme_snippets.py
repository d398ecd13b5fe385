"""The README's browser snippet (the API reference's own, relative ``fetch('/api/...')``), pasted
as-is into a page served by the API: the dashboard's, as the README tells a reader to do."""

from __future__ import annotations

from tests.readme_snippets import readme_snippet
from tests.ui.conftest import Servers


def test_the_browser_snippet_runs_in_the_dashboards_page(servers: Servers, open_page):
    page = open_page(servers.main, "/ui/")
    snippet = readme_snippet("browser")
    # A function, as the console would run the pasted lines (with top-level await).
    got = page.evaluate(f"async () => {{\n{snippet}\nreturn {{hourlyStats, dailyStats}};\n}}")
    for scale, stats in (("hour", got["hourlyStats"]), ("day", got["dailyStats"])):
        expected = servers.main.api("GET", "/api/stats/delivery", query={"timeScale": scale})
        # The worker may deliver in between (and an hour may turn): the same shape and buckets.
        assert set(stats) == set(expected)
        assert len(stats["data"]) == len(expected["data"])
        assert stats["total_delivered"] > 0  # the seeded history, read through the page
