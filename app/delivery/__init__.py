"""The delivery worker (API.md §10): lease due recipients, route them, deliver over SMTP, record.

Delivery orchestrates; the queue writes (``queue.leases``, ``queue.outcomes``,
``queue.retention``: docs/ARCHITECTURE.md).

content.py    what the worker reads of a claimed message (sender, raw content)
routing.py    smarthost or MX routing (RFC 5321 s5, RFC 7505) with an injectable resolver
smtp_client.py  SMTP transactions per destination, a connection pool for reuse and limits
outcomes.py   what a result means (retry schedule, queue lifetime), bounces, one commit per batch
recorder.py   the delivery threads' outcomes committed before their next transaction; outages
bounces.py    RFC 3464 delivery status notifications
maintenance.py  the worker's heartbeat
worker.py     the loop: threads, housekeeping, graceful SIGTERM, --once
cli.py        ``flask worker``
"""
