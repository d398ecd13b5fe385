"""gunicorn settings for the Elemta API (``gunicorn -c gunicorn.conf.py wsgi:app``).

gthread workers: flask-sock holds one thread per WebSocket, so each worker needs threads for
its sockets plus its ordinary requests. Sizing is explained in the README.
"""

import os

bind = os.environ.get("ELEMTA_API_LISTEN", "127.0.0.1:8025")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("ELEMTA_API_THREADS", "32"))
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = os.environ.get("ELEMTA_ACCESS_LOG", "-")
