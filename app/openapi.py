"""The OpenAPI document and its browsable UI, served without any CDN.

The Swagger UI assets come from the ``swagger-ui-bundle`` package and are served by the API
itself, so /api/docs works on an air-gapped mail host too.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, send_from_directory
from swagger_ui_bundle import swagger_ui_path

DOCS_ASSETS_URL = "/api/docs/static/"

assets = Blueprint("docs_assets", __name__)


@assets.get(DOCS_ASSETS_URL + "<path:filename>")
def docs_asset(filename: str) -> Response:
    return send_from_directory(swagger_ui_path, filename, max_age=86400)


def openapi_settings(version: str) -> dict[str, str]:
    return {
        "API_TITLE": "Elemta",
        "API_VERSION": version,
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/api",
        "OPENAPI_JSON_PATH": "openapi.json",
        "OPENAPI_SWAGGER_UI_PATH": "docs",
        "OPENAPI_SWAGGER_UI_URL": DOCS_ASSETS_URL,
    }


def document_security(api: Any) -> None:
    """The two ways to present an API key (API.md §8), offered on every operation."""
    api.spec.components.security_scheme(
        "bearerAuth", {"type": "http", "scheme": "bearer",
                       "description": "Authorization: Bearer elemta_..."})
    api.spec.components.security_scheme(
        "apiKeyHeader", {"type": "apiKey", "in": "header", "name": "X-API-Key"})
    # Which requests need which role depends on ELEMTA_AUTH_MODE; the empty alternative says
    # that a key is optional where the mode leaves the endpoint open.
    api.spec.options["security"] = [{"bearerAuth": []}, {"apiKeyHeader": []}, {}]


def document_metrics(app: Flask, api: Any) -> None:
    """``/metrics`` is a plain Flask route (Prometheus text, not JSON): listed here by hand so the
    document and /api/docs show every endpoint."""
    rule = next(r for r in app.url_map.iter_rules() if r.rule == "/metrics")
    api.spec.path(rule=rule, operations={"get": {
        "tags": ["health"],
        "summary": "Prometheus metrics (text exposition format)",
        "description": "Queue depth and oldest message age per state, delivery outcomes, the "
                       "delivery latency histogram, HTTP request durations, build info; summed "
                       "over every gunicorn worker (docs/OPERATIONS.md).",
        "responses": {"200": {"description": "Prometheus text",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    }})
