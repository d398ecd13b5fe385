"""The OpenAPI document and its browsable UI, served without any CDN.

The Swagger UI assets come from the ``swagger-ui-bundle`` package and are served by the API
itself, so /api/docs works on an air-gapped mail host too.
"""

from __future__ import annotations

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


def register_docs_assets(app: Flask) -> None:
    app.register_blueprint(assets)
