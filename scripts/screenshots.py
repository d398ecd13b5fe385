"""Screenshots of every dashboard page for review: 1280x800 and 390x844, light and dark.

`make screenshots` runs this: the same loopback stack as the browser tests (tests/ui/stack.py:
gunicorn, `flask worker`, an SMTP sink, a temporary SQLite database seeded with
`flask demo seed --seed 42`), signed in with an admin key made by `flask apikey create`.
Writes docs/screenshots/<page>-<width>x<height>-<theme>.png. Review artifacts, not goldens.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.ui.conftest import CHROMIUM, LAUNCH_ARGS  # noqa: E402
from tests.ui.stack import Sink, seeded_stack  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
SIZES = [(1280, 800), (390, 844)]
THEMES = ["light", "dark"]


def main() -> int:
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="elemta-screenshots-"))
    sink = Sink().start()
    stack = None
    try:
        stack = seeded_stack(workdir, "screenshots", sink=sink)
        key = stack.create_key("operator", "admin")
        stack.start_worker()
        message_id = stack.api("GET", "/api/queue/deferred", query={"limit": 1})[0]["id"]
        pages = {"overview": "/ui/", "queue": "/ui/queue?state=deferred&limit=25",
                 "message": f"/ui/message/{message_id}", "logs": "/ui/logs?view=events",
                 "keys": "/ui/keys", "health": "/ui/health"}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            for theme in THEMES:
                for width, height in SIZES:
                    context = browser.new_context(viewport={"width": width, "height": height},
                                                  color_scheme=theme, reduced_motion="reduce")
                    context.add_init_script(
                        f"sessionStorage.setItem('elemta.key', {json.dumps(key)})")
                    page = context.new_page()
                    for name, path in pages.items():
                        page.goto(stack.base_url + path)
                        page.wait_for_load_state("networkidle")
                        if name not in ("keys", "health"):  # the pages with a live stream
                            page.wait_for_selector("#live-status[data-state='live']")
                        target = OUT / f"{name}-{width}x{height}-{theme}.png"
                        page.screenshot(path=str(target))
                        print(f"wrote {target.relative_to(ROOT)}")
                    context.close()
            browser.close()
    finally:
        if stack is not None:
            stack.stop()
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
