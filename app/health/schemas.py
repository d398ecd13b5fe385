"""Health documents (API.md §5), for the OpenAPI document."""

from __future__ import annotations

import marshmallow as ma


class MemorySchema(ma.Schema):
    rss = ma.fields.Integer(metadata={"description": "Resident set size, bytes"})
    peak_rss = ma.fields.Integer(metadata={"description": "Peak resident set size, bytes"})


class DatabaseHealthSchema(ma.Schema):
    status = ma.fields.String(metadata={"description": "ok | unavailable"})
    latency_ms = ma.fields.Float(allow_none=True,
                                 metadata={"description": "Round trip of SELECT 1"})


class WorkerHealthSchema(ma.Schema):
    status = ma.fields.String(metadata={"description": "running | stale | absent | unknown"})
    last_heartbeat = ma.fields.String(allow_none=True,
                                      metadata={"description": "Newest heartbeat of any worker"})


class WebhookDispatcherHealthSchema(ma.Schema):
    status = ma.fields.String(metadata={"description": "running | stale | absent | unknown"})
    last_heartbeat = ma.fields.String(
        allow_none=True, metadata={"description": "Newest heartbeat of `flask webhook dispatch`"})
    pending = ma.fields.Integer(allow_none=True,
                                metadata={"description": "Webhook deliveries waiting to be sent"})
    active_webhooks = ma.fields.Integer(allow_none=True,
                                        metadata={"description": "Webhooks that get events"})


class QueueFiguresSchema(ma.Schema):
    pending = ma.fields.Integer()
    deferred = ma.fields.Integer()
    held = ma.fields.Integer()
    failed = ma.fields.Integer()
    total = ma.fields.Integer()


class HealthSchema(ma.Schema):
    """The health document; when unhealthy it also carries error, code and details."""

    status = ma.fields.String(metadata={"description": "healthy | degraded | unhealthy"})
    uptime = ma.fields.Integer(metadata={"description": "Seconds since the service started"})
    uptime_formatted = ma.fields.String()
    started_at = ma.fields.String()
    python_version = ma.fields.String()
    num_threads = ma.fields.Integer()
    memory = ma.fields.Nested(MemorySchema)
    database = ma.fields.Nested(DatabaseHealthSchema)
    worker = ma.fields.Nested(WorkerHealthSchema)
    queue = ma.fields.Nested(QueueFiguresSchema, allow_none=True)
    webhook_dispatcher = ma.fields.Nested(WebhookDispatcherHealthSchema, metadata={
        "description": "An addition to the contract: stale, or absent while a webhook is "
                       "active, makes the status degraded"})
    error = ma.fields.String(metadata={"description": "Only when unhealthy"})
    code = ma.fields.String(metadata={"description": "SERVICE_UNAVAILABLE, only when unhealthy"})
    details = ma.fields.Raw(allow_none=True, metadata={"description": "Only when unhealthy"})


class ProbeSchema(ma.Schema):
    status = ma.fields.String()
