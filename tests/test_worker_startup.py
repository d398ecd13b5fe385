"""An idle delivery worker imports only what delivering needs (issue 13: start-up < 1 s).

``flask worker --once`` and ``elemta worker --once`` run for real, in a process of their own,
on an empty queue; the modules the process imported are then read from its ``sys.modules``.
dkimpy, dnspython and prometheus_client are imported when first used (signing a bounce, an MX
lookup, the first delivery); marshmallow, the SMTP listener's and the webhook dispatcher's
commands belong to other processes (app/commands.py); ``elemta``'s service commands also skip
Flask's plugin discovery (Flask-Limiter's ``limiter`` group).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.delivery_helpers import ROOT

# Imported by the process, after the command returned: its exit status and its modules.
# ``python -c PROBE PROGRAM OUT ARGS...``: argv[0] is "-c"; the command runs as PROGRAM ARGS.
PROBE = """
import json, sys
_, program, out, *argv = sys.argv
sys.argv = [program, *argv]
if program.endswith("flask"):
    from flask.cli import main
else:
    from app.console import main
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""

NOT_FOR_AN_IDLE_WORKER = ("dkim", "dns", "prometheus_client", "marshmallow", "app.smtpd.cli",
                          "app.webhooks.cli", "app.metrics")


def _modules_after(program: str, database_url: str, out: str) -> set[str]:
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("ELEMTA_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    environment.update({"FLASK_APP": "wsgi.py", "ELEMTA_DATABASE_URL": database_url,
                        "ELEMTA_LOG_LEVEL": "warning"})
    command = os.path.join(os.path.dirname(sys.executable), program)
    finished = subprocess.run([sys.executable, "-c", PROBE, command, out, "worker", "--once"],
                              cwd=ROOT, env=environment, capture_output=True, timeout=120)
    assert finished.returncode == 0, finished.stderr.decode()
    with open(out) as f:
        result = json.load(f)
    assert result["code"] == 0, finished.stderr.decode()
    modules = set(result["modules"])
    assert "app.delivery.worker" in modules  # the probe did run the worker
    return modules


@pytest.mark.slow
@pytest.mark.parametrize("program", ["flask", "elemta"])
def test_an_idle_worker_imports_only_what_delivering_needs(app, database_url, tmp_path,
                                                           program):
    modules = _modules_after(program, database_url, str(tmp_path / "modules.json"))
    imported = sorted(name for name in NOT_FOR_AN_IDLE_WORKER if name in modules)
    assert imported == []
    if program == "elemta":
        # Its service commands skip the discovery of other packages' flask commands.
        assert "flask_limiter" not in modules
