"""Log endpoints (SPEC 4): thin views over ``logs.service``."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from flask import request
from flask.views import MethodView

from ..extensions import Blueprint, db
from . import service
from .schemas import (
    MessageEventListSchema,
    MessageEventQuerySchema,
    SystemLogListSchema,
    SystemLogQuerySchema,
)

blp = Blueprint("logs", __name__, url_prefix="/api/logs",
                description="System logs and message delivery events")


def _next_link(cursor: str) -> str:
    query = request.args.to_dict()
    query["cursor"] = cursor
    return f'<{request.base_url}?{urlencode(query)}>; rel="next"'


@blp.route("")
class SystemLogs(MethodView):
    @blp.arguments(SystemLogQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, SystemLogListSchema)
    def get(self, limit: int, level: int | None = None) -> dict[str, Any]:
        """System log records of every process, newest first"""
        logs = service.list_system_logs(db.session, min_levelno=level, limit=limit)
        return {"logs": logs, "count": len(logs)}


@blp.route("/messages")
class MessageEvents(MethodView):
    @blp.arguments(MessageEventQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, MessageEventListSchema, headers={"Link": {"schema": {"type": "string"}}})
    def get(self, limit: int, **filters: Any) -> Any:
        """Message delivery events, newest first (keyset paging: next_cursor / Link rel=next)"""
        page = service.list_message_events(db.session, limit=limit, **filters)
        body = {"logs": page.items, "count": len(page.items), "next_cursor": page.next_cursor}
        headers = {"Link": _next_link(page.next_cursor)} if page.next_cursor else {}
        return body, 200, headers
