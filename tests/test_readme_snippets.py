"""The README's node snippet, run by node against a live API (the browser one: tests/ui)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import TEST_ADMIN_KEY
from tests.readme_snippets import readme_snippet
from tests.stream_helpers import LiveServer

NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_node_snippet_prints_what_the_api_answers(make_app, app, tmp_path):
    live = LiveServer(make_app(auth_mode="all")).start()
    try:
        script = tmp_path / "stats.mjs"
        script.write_text(readme_snippet("node"))
        env = {**os.environ, "ELEMTA_URL": f"http://127.0.0.1:{live.port}",
               "ELEMTA_KEY": TEST_ADMIN_KEY}
        done = subprocess.run([NODE, str(script)], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout)
        expected = app.test_client().get("/api/stats/delivery?timeScale=day").get_json()
        assert printed == expected and printed["data"]  # the day buckets, zero-filled
        # Without the key the same script fails loudly, as the snippet's check says.
        env.pop("ELEMTA_KEY")
        refused = subprocess.run([NODE, str(script)], env=env, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode != 0 and "HTTP 401" in refused.stderr
    finally:
        live.stop()
