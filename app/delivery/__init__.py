"""The delivery worker (SPEC 10): claim due recipients, route them, deliver over SMTP, record.

claim.py      leases on due recipients (SKIP LOCKED on PostgreSQL, conditional UPDATE on SQLite)
content.py    what the worker reads of a claimed message (sender, raw content)
routing.py    smarthost or MX routing (RFC 5321 s5, RFC 7505) with an injectable resolver
smtp_client.py  SMTP transactions per destination, a connection pool for reuse and limits
outcomes.py   per-recipient results -> recipient state, events, rollup, queue state (one commit)
bounces.py    RFC 3464 delivery status notifications
maintenance.py  heartbeat and the purge of expired failed messages
worker.py     the loop: threads, housekeeping, graceful SIGTERM, --once
cli.py        ``flask worker``
"""
