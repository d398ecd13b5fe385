"""The project's flask-smorest flavour: ``Api`` and ``Blueprint`` speaking the contract.

Imported by the endpoints and ``create_app``'s API steps only: the processes that serve no HTTP
do without flask-smorest, webargs and marshmallow's OpenAPI machinery (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import typing

import flask
import flask_smorest
import marshmallow as ma
from webargs import core as webargs_core
from webargs.flaskparser import FlaskParser, is_json_request

from .errors import ApiError, handle_http_exception
from .http import MAX_JSON_DEPTH, UNSTORABLE_REFUSED, contains_unstorable, json_nests_deeper_than


class ErrorSchema(ma.Schema):
    """The contract's error body (documentation of every error response)."""

    error = ma.fields.String(required=True)
    code = ma.fields.String(required=True)
    # Always present: null, a string, or field name -> messages (validation).
    details = ma.fields.Raw(required=True, allow_none=True)


class Parser(FlaskParser):
    """webargs parser speaking the contract: 400 (not 422), INVALID_JSON, 415."""

    DEFAULT_VALIDATION_STATUS = 400

    def load_json(self, req: flask.Request, schema: ma.Schema) -> typing.Any:
        has_body = bool(req.content_length) or bool(req.get_data(cache=True))
        if has_body and not is_json_request(req):
            raise ApiError(
                415, "UNSUPPORTED_MEDIA_TYPE", "Unsupported media type; send application/json"
            )
        if has_body and json_nests_deeper_than(req.get_data(cache=True)):
            raise ApiError(400, "INVALID_JSON",
                           f"The JSON body nests deeper than {MAX_JSON_DEPTH} levels")
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
