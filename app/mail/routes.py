"""``POST /api/send-test`` (API.md §6): a thin view over ``mail.service``."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView

from ..api import Blueprint
from ..config import local_hostname
from ..extensions import db
from . import service
from .schemas import SendTestResultSchema, SendTestSchema

blp = Blueprint("mail", __name__, url_prefix="/api", description="Test email")


@blp.route("/send-test")
class SendTest(MethodView):
    @blp.arguments(SendTestSchema)
    @blp.response(200, SendTestResultSchema)
    def post(self, args: dict[str, Any]) -> dict[str, str]:
        """Queue a test email; the delivery worker then delivers it like any other message"""
        hostname = local_hostname(current_app.config["SMTP_HOSTNAME"])
        message = service.send_test(db.session(), args["sender"], args["to"], args["subject"],
                                    args["body"], hostname)
        return {"status": "success", "message_id": message.id,
                "message": "Test email queued successfully"}
