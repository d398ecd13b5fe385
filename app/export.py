"""Exports of listings as CSV and NDJSON, streamed (docs/API.md §17).

A listing that can be exported (message events, queue listings) asks ``wanted_format`` what
the client wants: ``?format=csv|ndjson|json`` when given, else the ``Accept`` header (only an
explicit preference for ``text/csv`` or ``application/x-ndjson`` over JSON; ``*/*`` is JSON).
The answer is then a generator over the listing's own keyset pages (``pages``): every page is
serialised and sent before the next is read, so memory stays the size of one page whatever the
size of the export, and every row is read through the same filters and index ranges as the
JSON listing.

CSV cells that a spreadsheet would take for a formula (starting with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return) get a leading ``'`` (OWASP, "CSV Injection"); numbers are
written as numbers. Lists become their items joined by ``", "`` (addresses) or JSON.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from flask import Response, request, stream_with_context

EXPORT_FORMATS = ("json", "csv", "ndjson")
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}
_ACCEPTED = {"application/json": "json", "text/csv": "csv", "application/x-ndjson": "ndjson"}
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
EXPORT_PAGE = 1000



def openapi_content(json_schema: Any) -> dict[str, Any]:
    """The OpenAPI description of an exportable listing's 200 bodies (``blp.doc``): its JSON
    schema (given again: a ``content`` given here replaces the response decorator's) and the
    two export types."""
    return {"responses": {"200": {"content": {
        "application/json": {"schema": json_schema},
        "text/csv": {"schema": {"type": "string"}},
        "application/x-ndjson": {"schema": {"type": "string"}},
    }}}}


FORMAT_DESCRIPTION = ("json (default), csv or ndjson: the whole listing, streamed (the Accept "
                      "header text/csv or application/x-ndjson does the same)")


def wanted_format(format_arg: str | None) -> str:
    """``json``, ``csv`` or ``ndjson``: the query parameter, else the Accept header."""
    if format_arg:
        return format_arg
    best = request.accept_mimetypes.best_match(list(_ACCEPTED), default="application/json")
    chosen = _ACCEPTED.get(best or "", "json")
    # A tie (``*/*`` or equal qualities) is JSON, the listing's own shape.
    if chosen != "json" and request.accept_mimetypes[best] <= \
            request.accept_mimetypes["application/json"]:
        return "json"
    return chosen


def neutralise(value: Any) -> Any:
    """A CSV cell a spreadsheet reads as text, never as a formula."""
    if value is None:
        return ""
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, list):
        value = ", ".join(value) if all(isinstance(v, str) for v in value) \
            else json.dumps(value, separators=(",", ":"))
    elif not isinstance(value, str):
        value = json.dumps(value, separators=(",", ":"))
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def csv_lines(columns: Sequence[str], items: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    for item in items:
        writer.writerow([neutralise(item.get(column)) for column in columns])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def ndjson_lines(items: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    for item in items:
        yield json.dumps(item, separators=(",", ":"), ensure_ascii=False) + "\n"


def stream_export(fmt: str, pages: Iterable[Sequence[Any]],
                  dump: Callable[[Sequence[Any]], list[dict[str, Any]]],
                  columns: Sequence[str], filename: str,
                  headers: Mapping[str, str] | None = None) -> Response:
    """The streamed answer: ``pages`` of rows, each turned into items by ``dump``."""

    def items() -> Iterator[dict[str, Any]]:
        for page in pages:
            yield from dump(page)

    body = csv_lines(columns, items()) if fmt == "csv" else ndjson_lines(items())
    response = Response(stream_with_context(body), mimetype=None,
                        content_type=MEDIA_TYPES[fmt], headers=dict(headers or {}))
    extension = "csv" if fmt == "csv" else "ndjson"
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}.{extension}"'
    response.vary.add("Accept")
    return response
