"""/api/health for people and dashboards, /livez and /readyz for orchestrators (API.md §5)."""

from __future__ import annotations

from flask import Response, current_app, jsonify
from flask.views import MethodView

from ..api import Blueprint
from ..errors import error_response
from ..extensions import db
from . import service
from .schemas import HealthSchema, ProbeSchema

blp = Blueprint("health", __name__, description="Health and readiness")

UNAVAILABLE = "Database unavailable"


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


@blp.route("/api/health")
class Health(MethodView):
    @blp.response(200, HealthSchema)
    @blp.alt_response(503, schema=HealthSchema,
                      description="Unhealthy: the database does not answer")
    def get(self) -> Response:
        """Service health: database, delivery worker, queue and this process"""
        report = service.health_report(db.session())
        body = report.body
        if report.status == "unhealthy":
            # The health document and the contract's error shape in one body: dashboards read
            # the former, generic API clients the latter.
            body = {**body, "error": UNAVAILABLE, "code": "SERVICE_UNAVAILABLE", "details": None}
        response = jsonify(body)
        response.status_code = 503 if report.status == "unhealthy" else 200
        return response


@blp.route("/livez")
class Live(MethodView):
    @blp.response(200, ProbeSchema)
    def get(self) -> Response:
        """Liveness: the process answers (no database access)"""
        return _no_store(jsonify({"status": "alive"}))


@blp.route("/readyz")
class Ready(MethodView):
    @blp.response(200, ProbeSchema)
    @blp.alt_response(503, description="The database does not answer")
    def get(self) -> Response:
        """Readiness: the database answers and holds this release's schema"""
        problem = service.readiness_problem(db.session(),
                                            current_app.extensions["migrate"].directory)
        if problem is None:
            return _no_store(jsonify({"status": "ready"}))
        return _no_store(error_response(503, "SERVICE_UNAVAILABLE", problem))
