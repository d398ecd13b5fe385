"""The single home of the Flask extensions and the project's flask-smorest flavour."""

from __future__ import annotations

import typing

import flask
import flask_smorest
import marshmallow as ma
import sqlalchemy as sa
from flask_migrate import Migrate
from flask_sock import Sock
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase
from webargs import core as webargs_core
from webargs.flaskparser import FlaskParser, is_json_request

from .database import Session
from .errors import ApiError, handle_http_exception
from .http import UNSTORABLE_REFUSED, contains_unstorable

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


# Session: GET requests read on autocommit connections on PostgreSQL (app/database.py).
db = SQLAlchemy(model_class=Base, session_options={"class_": Session})
migrate = Migrate()
sock = Sock()


@sa.event.listens_for(sa.engine.Engine, "connect")
def _sqlite_pragmas(dbapi_connection: typing.Any, _record: typing.Any) -> None:
    """WAL, a busy timeout and foreign keys for every SQLite connection.

    WAL lets the API read while the worker and the listener write; the busy timeout makes a
    writer wait for the lock instead of failing; foreign keys make deletes cascade.
    """
    module = type(dbapi_connection).__module__
    if not module.startswith("sqlite3"):
        return
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class ErrorSchema(ma.Schema):
    """The contract's error body (documentation of every error response)."""

    error = ma.fields.String(required=True)
    code = ma.fields.String(required=True)
    details = ma.fields.Raw(allow_none=True)


class Parser(FlaskParser):
    """webargs parser speaking the contract: 400 (not 422), INVALID_JSON, 415."""

    DEFAULT_VALIDATION_STATUS = 400

    def load_json(self, req: flask.Request, schema: ma.Schema) -> typing.Any:
        has_body = bool(req.content_length) or bool(req.get_data(cache=True))
        if has_body and not is_json_request(req):
            raise ApiError(
                415, "UNSUPPORTED_MEDIA_TYPE", "Unsupported media type; send application/json"
            )
        data = super().load_json(req, schema)
        if data is webargs_core.missing and not has_body:
            raise ApiError(400, "INVALID_JSON", "A JSON object body is required")
        if not isinstance(data, dict):
            raise ApiError(400, "INVALID_JSON", "The JSON body must be an object")
        if contains_unstorable(data):
            raise ApiError(400, "VALIDATION_ERROR", UNSTORABLE_REFUSED)
        return data

    def _handle_invalid_json_error(self, error: Exception, req: flask.Request, *args: typing.Any,
                                   **kwargs: typing.Any) -> typing.NoReturn:
        raise ApiError(400, "INVALID_JSON", "Request body is not valid JSON")

    def handle_error(self, error: ma.ValidationError, req: flask.Request, schema: ma.Schema, *,
                     error_status_code: int | None,
                     error_headers: typing.Mapping[str, str] | None) -> typing.NoReturn:
        raise ApiError(400, "VALIDATION_ERROR", "Invalid request", _unwrap_location(error))


def _unwrap_location(error: ma.ValidationError) -> typing.Any:
    """webargs nests messages under the location ("query", "json"); the contract does not."""
    messages = error.normalized_messages()
    if isinstance(messages, dict):
        flat: dict[str, typing.Any] = {}
        for location, fields in messages.items():
            if isinstance(fields, dict):
                flat.update(fields)
            else:
                flat[location] = fields
        return flat
    return messages


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest blueprint with the contract's parser."""

    ARGUMENTS_PARSER = Parser()


class Api(flask_smorest.Api):
    """flask-smorest Api answering every HTTP error in the contract's shape."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: typing.Any) -> flask.Response:
        return handle_http_exception(error)
