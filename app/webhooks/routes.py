"""``/api/webhooks``: signed event notifications (admin only, see ``auth.guard``)."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView

from ..api import Blueprint
from ..extensions import db
from ..http import next_page_link
from ..schemas import StatusSchema
from . import service
from .dispatcher import setting
from .schemas import (
    DeliveryListSchema,
    DeliveryQuerySchema,
    WebhookCreateSchema,
    WebhookDeliverySchema,
    WebhookSchema,
    WebhookUpdateSchema,
    WebhookWithSecretSchema,
)

blp = Blueprint("webhooks", __name__, url_prefix="/api/webhooks",
                description="Signed webhooks: message events POSTed to your receivers "
                            "(admin only; docs/WEBHOOKS.md)")


def _with_secret(created: service.Created) -> dict[str, Any]:
    hook = created.webhook
    return {"secret": created.secret,
            **{name: getattr(hook, name) for name in WebhookSchema().fields}}


@blp.route("")
class Webhooks(MethodView):
    @blp.response(200, WebhookSchema(many=True))
    def get(self) -> Any:
        """List webhooks (never their secrets)"""
        return service.list_webhooks(db.session())

    @blp.arguments(WebhookCreateSchema)
    @blp.response(201, WebhookWithSecretSchema)
    def post(self, data: dict[str, Any]) -> Any:
        """Create a webhook; the response is the only place its secret appears"""
        return _with_secret(service.create_webhook(db.session(), **data))


@blp.route("/<int:webhook_id>")
class WebhookById(MethodView):
    @blp.response(200, WebhookSchema)
    def get(self, webhook_id: int) -> Any:
        """One webhook"""
        return service.get_webhook(db.session(), webhook_id)

    @blp.arguments(WebhookUpdateSchema)
    @blp.response(200, WebhookWithSecretSchema)
    def patch(self, data: dict[str, Any], webhook_id: int) -> Any:
        """Change a webhook; a new secret (rotate_secret) is shown in this response only"""
        return _with_secret(service.update_webhook(db.session(), webhook_id, **data))

    @blp.response(200, StatusSchema)
    def delete(self, webhook_id: int) -> Any:
        """Delete a webhook and its delivery history"""
        service.delete_webhook(db.session(), webhook_id)
        return {"status": "success", "message": f"Webhook {webhook_id} deleted"}


@blp.route("/<int:webhook_id>/deliveries")
class WebhookDeliveries(MethodView):
    @blp.arguments(DeliveryQuerySchema, location="query", as_kwargs=True)
    @blp.response(200, DeliveryListSchema, headers={"Link": {"schema": {"type": "string"}}})
    def get(self, webhook_id: int, limit: int, **filters: Any) -> Any:
        """Deliveries of a webhook with every attempt, newest first (next_cursor / Link)"""
        page = service.list_deliveries(db.session(), webhook_id, limit=limit, **filters)
        body = {"deliveries": page.items, "count": len(page.items),
                "next_cursor": page.next_cursor}
        headers = {"Link": next_page_link(cursor=page.next_cursor)} if page.next_cursor else {}
        return body, 200, headers


@blp.route("/<int:webhook_id>/deliveries/<int:delivery_id>")
class WebhookDeliveryById(MethodView):
    @blp.response(200, WebhookDeliverySchema)
    def get(self, webhook_id: int, delivery_id: int) -> Any:
        """One delivery with every attempt"""
        return service.get_delivery(db.session(), webhook_id, delivery_id)


@blp.route("/<int:webhook_id>/deliveries/<int:delivery_id>/redeliver")
class WebhookRedeliver(MethodView):
    @blp.response(202, WebhookDeliverySchema)
    def post(self, webhook_id: int, delivery_id: int) -> Any:
        """Send a delivery again (same body and event id) as soon as the dispatcher can"""
        window = int(setting(current_app.config, "WEBHOOK_RETRY_WINDOW"))
        return service.redeliver(db.session(), webhook_id, delivery_id, window)
