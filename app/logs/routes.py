"""Log endpoints (API.md §4): thin views over ``logs.service``."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from ..api import Blueprint
from ..export import openapi_content, stream_export, wanted_format
from ..extensions import db
from ..http import next_page_link
from . import service
from .schemas import (
    MessageEventListSchema,
    MessageEventQuerySchema,
    MessageEventSchema,
    SystemLogListSchema,
    SystemLogQuerySchema,
)

EVENT_ITEM = MessageEventSchema(many=True)
EVENT_COLUMNS = tuple(EVENT_ITEM.fields)

blp = Blueprint("logs", __name__, url_prefix="/api/logs",
                description="System logs and message delivery events")


@blp.route("")
class SystemLogs(MethodView):
    @blp.arguments(SystemLogQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, SystemLogListSchema)
    def get(self, limit: int, level: int | None = None) -> dict[str, Any]:
        """System log records of every process, newest first"""
        logs = service.list_system_logs(db.session(), min_levelno=level, limit=limit)
        return {"logs": logs, "count": len(logs)}


@blp.route("/messages")
class MessageEvents(MethodView):
    @blp.arguments(MessageEventQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, MessageEventListSchema, headers={"Link": {"schema": {"type": "string"}}})
    @blp.doc(**openapi_content(MessageEventListSchema))
    def get(self, limit: int, format: str | None = None, **filters: Any) -> Any:
        """Message delivery events, newest first (keyset paging: next_cursor / Link rel=next)"""
        fmt = wanted_format(format)
        if fmt != "json":  # every matching event, streamed (API.md §17)
            pages = service.message_event_pages(db.session(), **filters)
            return stream_export(fmt, pages, EVENT_ITEM.dump, EVENT_COLUMNS, "events")
        page = service.list_message_events(db.session(), limit=limit, **filters)
        body = {"logs": page.items, "count": len(page.items), "next_cursor": page.next_cursor}
        headers = {"Link": next_page_link(cursor=page.next_cursor)} if page.next_cursor else {}
        return body, 200, headers
