"""The yardstick of the HTTP suite: a bare Flask app with one small JSON endpoint.

``gunicorn -c gunicorn.conf.py bench.bare_app:app`` serves it under exactly the settings of the
real API (worker class, workers, threads, keep-alive, logging), so the ratio of the two
throughputs is what the application's own stack costs (API.md §13).
"""

from flask import Flask

app = Flask(__name__)


@app.get("/bare")
def bare() -> dict[str, int]:
    # The same shape and size as /api/queue/stats' answer.
    return {"pending": 0, "deferred": 0, "held": 0, "failed": 0, "total": 0}
