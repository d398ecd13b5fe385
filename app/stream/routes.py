"""WebSocket endpoints (API.md §7): ordinary Flask routes under /api, so every request hook
(authentication with the ``api_key`` query parameter, rate limits, request ids) runs before the
upgrade, and a bad parameter is refused with the contract's 400 before any handshake."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import Response, request
from werkzeug.routing.exceptions import WebsocketMismatch

from ..api import Blueprint
from ..errors import error_response
from ..logs.levels import ACCEPTED as LEVEL_NAMES
from ..logs.schemas import EventType, MinimumLevel
from ..models import EVENT_TYPES
from . import sockets
from .position import MAX_ROW_ID, CursorError, Position, decode_cursor

blp = Blueprint("stream", __name__, url_prefix="/api",
                description="Live streams over WebSocket (see docs/STREAMS.md)")

_UPGRADE_DOC = {
    "101": {"description": "Switching Protocols: the WebSocket stream starts"},
}


def _resume_id(description: str) -> ma.fields.Integer:
    """A row id to resume after: 0 .. 2**63-1 (ids are 64-bit), 400 before the handshake."""
    return ma.fields.Integer(strict=False, validate=ma.validate.Range(min=0, max=MAX_ROW_ID),
                             metadata={"description": description})


class _ResumeSchema(ma.Schema):
    cursor = ma.fields.String(metadata={
        "description": "Resume after this point: the `cursor` of the last frame received"})
    since_event = _resume_id("Resume after this delivery event id (simple form of `cursor`)")

    @ma.validates("cursor")
    def _check_cursor(self, value: str, **_: Any) -> None:
        try:
            decode_cursor(value)
        except CursorError:
            raise ma.ValidationError("Not a cursor from this API.") from None

    @ma.validates_schema
    def _one_resume_form(self, data: dict[str, Any], **_: Any) -> None:
        if "cursor" in data and any(k in data for k in ("since_event", "since_log")):
            raise ma.ValidationError("Give either cursor or since_event/since_log, not both.",
                                     "cursor")

    def resume_points(self, args: dict[str, Any]) -> tuple[Position | None, Position | None]:
        if "cursor" in args:
            return decode_cursor(args["cursor"])
        events = Position(args["since_event"]) if "since_event" in args else None
        logs = Position(args["since_log"]) if "since_log" in args else None
        return events, logs


class LogStreamQuerySchema(_ResumeSchema):
    level = MinimumLevel(metadata={
        "description": "Minimum severity of log frames: debug, info, warn, error, fatal "
                       "(warning, critical accepted)", "enum": list(LEVEL_NAMES)})
    event_type = EventType(metadata={"description": "Only message events of this type",
                                     "enum": list(EVENT_TYPES)})
    type = ma.fields.String(validate=ma.validate.OneOf(("log", "message_event")), metadata={
        "description": "Only frames of this type (default: both)"})
    since_log = _resume_id("Resume after this system log id (simple form of `cursor`)")


class QueueStreamQuerySchema(_ResumeSchema):
    pass


@blp.route("/logs/ws", websocket=True)
@blp.arguments(LogStreamQuerySchema, location="query")
@blp.doc(responses=_UPGRADE_DOC)
def logs_stream(args: dict[str, Any]) -> Response:
    """Live log records and message events (WebSocket)"""
    events, logs = LogStreamQuerySchema().resume_points(args)
    return sockets.serve(sockets.StreamSpec(
        kind="logs", events=events, logs=logs, event_type=args.get("event_type"),
        min_levelno=args.get("level"),
        only=args.get("type")))


@blp.route("/queue/ws", websocket=True)
@blp.arguments(QueueStreamQuerySchema, location="query")
@blp.doc(responses=_UPGRADE_DOC)
def queue_stream(args: dict[str, Any]) -> Response:
    """Live queue statistics and queue changes (WebSocket)"""
    events, _ = QueueStreamQuerySchema().resume_points(args)
    return sockets.serve(sockets.StreamSpec(kind="queue", events=events))


@blp.app_errorhandler(WebsocketMismatch)
def _websocket_mismatch(error: WebsocketMismatch) -> Response:
    """A plain request to a stream, or a WebSocket handshake to a plain endpoint."""
    if request.path.endswith("/ws"):
        message = "This is a WebSocket endpoint: connect with a WebSocket client"
    else:
        message = "This endpoint does not accept WebSocket connections"
    return error_response(400, "VALIDATION_ERROR", message, None)
