"""Many rows in one fixed INSERT on PostgreSQL: ``INSERT ... SELECT * FROM unnest(arrays)``.

A multi-row ``INSERT ... VALUES (...), (...)`` is a different statement for every batch size:
SQLAlchemy renders it anew (``insertmanyvalues``), PostgreSQL parses and plans it anew, and
psycopg sends one parameter per value. ``ArrayInsert`` sends one array per column instead:

    INSERT INTO t (a, b) SELECT * FROM unnest(%s::varchar(64)[], %s::timestamptz[])

one statement text whatever the batch size, so psycopg prepares it once per connection and
PostgreSQL keeps its plan; the rows are built column-wise without SQLAlchemy's compilation.

The statement runs on the raw psycopg cursor of the caller's connection, so it is part of the
caller's transaction. It therefore bypasses SQLAlchemy's ``before_cursor_execute`` and
``after_cursor_execute`` events (and echo): code that watches statements through them does not
see these INSERTs. Values go through the column types' bind processors (``UTCDateTime``'s
checks, JSON's serialisation), as through Core.

For PostgreSQL only; callers keep their Core path for SQLite. Large ``bytea`` values are
better sent by Core, one parameter each (``SMALL_BATCH_BYTES``): callers fall back above it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

# Above this much content per batch, callers keep the Core INSERT (see the module's text).
SMALL_BATCH_BYTES = 1024 * 1024

_Processor = Any  # a column type's bind processor, or None


def supported(connection: sa.Connection) -> bool:
    return connection.dialect.name == "postgresql"


class ArrayInsert:
    """``INSERT INTO table (columns) SELECT * FROM unnest(one array per column)``."""

    def __init__(self, table: sa.Table, columns: Sequence[str] | None = None) -> None:
        self.table = table
        if columns is None:  # every column but an autoincrementing key
            columns = [c.name for c in table.c
                       if not (c.primary_key and c.autoincrement is True)]
        self.columns = tuple(columns)
        self._compiled: dict[str, tuple[str, list[_Processor]]] = {}

    def _compile(self, dialect: Dialect) -> tuple[str, list[_Processor]]:
        preparer = dialect.identifier_preparer
        casts = []
        processors = []
        for name in self.columns:
            column = self.table.c[name]
            casts.append(f"%s::{column.type.compile(dialect=dialect)}[]")
            processors.append(column.type.dialect_impl(dialect).bind_processor(dialect))
        sql = (f"INSERT INTO {preparer.format_table(self.table)} "
               f"({', '.join(preparer.quote(name) for name in self.columns)}) "
               f"SELECT * FROM unnest({', '.join(casts)})")
        return sql, processors

    def statement(self, dialect: Dialect) -> str:
        return self._compiled_for(dialect)[0]

    def _compiled_for(self, dialect: Dialect) -> tuple[str, list[_Processor]]:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = self._compile(dialect)
        return compiled

    def execute(self, connection: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert ``rows`` (dicts with every column of the statement) in the connection's
        transaction. Not seen by ``before_cursor_execute`` listeners."""
        if not rows:
            return
        sql, processors = self._compiled_for(connection.dialect)
        arrays = []
        for name, process in zip(self.columns, processors, strict=True):
            if process is None:
                arrays.append([row[name] for row in rows])
            else:
                arrays.append([process(row[name]) for row in rows])  # None too, as Core
        cursor = connection.connection.cursor()
        try:
            cursor.execute(sql, arrays)
        finally:
            cursor.close()
