"""Queue endpoints (API.md §2.2): thin views over ``queue.service``."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app
from flask.views import MethodView
from werkzeug.routing import BaseConverter

from ..api import Blueprint
from ..auth import current_actor
from ..delivery.diagnosis import DiagnosisSettings, diagnose
from ..export import openapi_content, stream_export, wanted_format
from ..extensions import db
from ..http import next_page_link
from ..schemas import CountedStatusSchema, StatusSchema
from . import service
from .schemas import (
    BulkQuerySchema,
    DetailQuerySchema,
    DiagnosisSchema,
    ListQuerySchema,
    MessageDetailSchema,
    MessageSchema,
    QueueShapeQuerySchema,
    QueueShapeSchema,
    QueueStatsSchema,
)

MESSAGE_ITEM = MessageSchema(many=True)
MESSAGE_COLUMNS = tuple(field.data_key or name for name, field in MESSAGE_ITEM.fields.items())

blp = Blueprint("queue", __name__, url_prefix="/api/queue", description="The mail queue")
blp.record_once(lambda state: service.init_stats_reads(state.app))


class ListingTypeConverter(BaseConverter):
    """The ``{queue_type}`` of the listing: any segment but ``ws``.

    ``/api/queue/ws`` is the queue stream. Werkzeug skips a WebSocket rule for a plain request
    and would take the listing's instead ("Unknown queue type 'ws'"); without a rule to fall
    back on it reports the mismatch, answered like ``/api/logs/ws`` (app/stream/routes.py).
    Any other unknown type still reaches the view and its 400.
    """

    regex = r"(?!ws(?![^/]))[^/]+"


# Registered before the routes below are added to an app (deferred functions run in order).
blp.record_once(lambda state: state.app.url_map.converters.setdefault(
    "listing_type", ListingTypeConverter))


def queue_type_parameter(types: tuple[str, ...]) -> dict[str, Any]:
    """The OpenAPI description of ``{queue_type}``: exactly the types the endpoint accepts."""
    return {"in": "path", "name": "queue_type", "required": True,
            "schema": {"type": "string", "enum": list(types)}}


def _filters(args: dict[str, Any]) -> service.MessageFilters:
    return service.MessageFilters(
        sender=args.get("sender"),
        recipient=args.get("recipient"),
        domain=args.get("domain"),
        before=args.get("before"),
        after=args.get("after"),
    )


@blp.route("/stats")
class QueueStats(MethodView):
    @blp.response(200, QueueStatsSchema)
    def get(self) -> dict[str, int]:
        """Number of messages in each queue state"""
        # The scoped session itself: the read needs no ORM session (database.DriverRead);
        # concurrent requests of this process share one read (reading.shared_queue_stats).
        return service.shared_queue_stats(db.session)


@blp.route("/shape")
class QueueShape(MethodView):
    @blp.arguments(QueueShapeQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, QueueShapeSchema)
    def get(self, queue: str, by: str, top: int) -> Any:
        """Queued mail per domain and age bucket (Postfix's qshape), exact at as_of"""
        return service.read_shape(db.session(), queue, by, top)


@blp.route("/<listing_type:queue_type>", parameters=[queue_type_parameter(service.LIST_TYPES)])
class QueueListing(MethodView):
    @blp.arguments(ListQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, MessageSchema(many=True),
                  headers={"X-Total-Count": {"schema": {"type": "integer"}},
                           "Link": {"schema": {"type": "string"}}})
    @blp.doc(**openapi_content(MessageSchema(many=True)))
    def get(self, queue_type: str, limit: int, cursor: str | None = None,
            format: str | None = None, **filters: Any) -> Any:
        """List messages of a queue (pending, deferred, held, failed or all), oldest first"""
        fmt = wanted_format(format)
        if fmt != "json":  # every matching message, streamed (API.md §17)
            session = db.session()
            total = service.count_messages(session, queue_type, _filters(filters))
            pages = service.message_pages(session, queue_type, _filters(filters), cursor=cursor)
            return stream_export(fmt, pages, MESSAGE_ITEM.dump, MESSAGE_COLUMNS,
                                        f"queue-{queue_type}", {"X-Total-Count": str(total)})
        page = service.list_messages(db.session(), queue_type, _filters(filters), limit=limit,
                                     cursor=cursor)
        headers = {"X-Total-Count": str(page.total)}
        if page.next_cursor:
            headers["Link"] = next_page_link(cursor=page.next_cursor)
        return page.items, 200, headers


@blp.route("/<string:queue_type>/flush",
           parameters=[queue_type_parameter(service.BULK_TYPES["flush"])])
class QueueFlush(MethodView):
    @blp.arguments(BulkQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, CountedStatusSchema)
    def post(self, queue_type: str, dry_run: bool, **filters: Any) -> dict[str, Any]:
        """Delete every message of a queue (with the listing filters; dry_run counts only)"""
        count = service.bulk_action(db.session(), "flush", queue_type, _filters(filters),
                                    current_actor(), dry_run=dry_run)
        verb = "would be flushed" if dry_run else "flushed"
        return {"status": "success", "message": f"Queue {queue_type} {verb}", "count": count}


def _bulk_done(action: str, count: int, dry_run: bool) -> dict[str, Any]:
    past = service.PAST_TENSE[action]
    done = f"would be {past}" if dry_run else past
    return {"status": "success", "message": f"{count} message(s) {done}", "count": count}


@blp.route("/<string:queue_type>/retry",
           parameters=[queue_type_parameter(service.BULK_TYPES["retry"])])
class QueueBulkRetry(MethodView):
    @blp.arguments(BulkQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, CountedStatusSchema)
    def post(self, queue_type: str, dry_run: bool, **filters: Any) -> dict[str, Any]:
        """Retry every matching message now (deferred, failed or all)"""
        count = service.bulk_action(db.session(), "retry", queue_type, _filters(filters),
                                    current_actor(), dry_run=dry_run)
        return _bulk_done("retry", count, dry_run)


@blp.route("/<string:queue_type>/hold",
           parameters=[queue_type_parameter(service.BULK_TYPES["hold"])])
class QueueBulkHold(MethodView):
    @blp.arguments(BulkQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, CountedStatusSchema)
    def post(self, queue_type: str, dry_run: bool, **filters: Any) -> dict[str, Any]:
        """Hold every matching message (pending, deferred or all)"""
        count = service.bulk_action(db.session(), "hold", queue_type, _filters(filters),
                                    current_actor(), dry_run=dry_run)
        return _bulk_done("hold", count, dry_run)


@blp.route("/<string:queue_type>/release",
           parameters=[queue_type_parameter(service.BULK_TYPES["release"])])
class QueueBulkRelease(MethodView):
    @blp.arguments(BulkQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, CountedStatusSchema)
    def post(self, queue_type: str, dry_run: bool, **filters: Any) -> dict[str, Any]:
        """Release every matching held message (type must be held)"""
        count = service.bulk_action(db.session(), "release", queue_type, _filters(filters),
                                    current_actor(), dry_run=dry_run)
        return _bulk_done("release", count, dry_run)


@blp.route("/message/<string:message_id>")
class QueueMessage(MethodView):
    @blp.arguments(DetailQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, MessageDetailSchema)
    # One status, two representations: the raw message is a second content type of the 200
    # (an alt_response with the same status would replace the JSON one in the document).
    @blp.doc(responses={"200": {"description": "The message; with format=raw the raw message",
                                "content": {
                                    "application/json": {"schema": MessageDetailSchema},
                                    "message/rfc822": {"schema": {"type": "string"}}}}})
    def get(self, message_id: str, format: str) -> Any:
        """A message with recipients, headers, content and events; format=raw: the message"""
        if format == "raw":
            raw = service.message_raw(db.session(), message_id)
            return Response(raw, mimetype="message/rfc822")
        return service.message_detail(db.session(), message_id)

    @blp.response(200, StatusSchema)
    def delete(self, message_id: str) -> dict[str, str]:
        """Delete a message from the queue"""
        service.delete_message(db.session(), message_id, current_actor())
        return {"status": "success", "message": f"Message {message_id} deleted"}


@blp.route("/message/<string:message_id>/diagnosis")
class QueueMessageDiagnosis(MethodView):
    @blp.response(200, DiagnosisSchema)
    def get(self, message_id: str) -> Any:
        """Why a message is still queued: per recipient, attempts, schedule, lease, control"""
        return diagnose(db.session(), message_id,
                        DiagnosisSettings.from_config(current_app.config))


def _done(message_id: str, action: str) -> dict[str, str]:
    return {"status": "success", "message": f"Message {message_id} {service.PAST_TENSE[action]}"}


@blp.route("/message/<string:message_id>/retry")
class QueueMessageRetry(MethodView):
    @blp.response(200, StatusSchema)
    def post(self, message_id: str) -> dict[str, str]:
        """Make a message due now; failed recipients get another chance"""
        service.retry_message(db.session(), message_id, current_actor())
        return _done(message_id, "retry")


@blp.route("/message/<string:message_id>/hold")
class QueueMessageHold(MethodView):
    @blp.response(200, StatusSchema)
    def post(self, message_id: str) -> dict[str, str]:
        """Put a message on hold"""
        service.hold_message(db.session(), message_id, current_actor())
        return _done(message_id, "hold")


@blp.route("/message/<string:message_id>/release")
class QueueMessageRelease(MethodView):
    @blp.response(200, StatusSchema)
    def post(self, message_id: str) -> dict[str, str]:
        """Release a held message; it becomes due now"""
        service.release_message(db.session(), message_id, current_actor())
        return _done(message_id, "release")
