"""Many rows in one ``COPY ... FROM STDIN (FORMAT BINARY)`` on PostgreSQL.

It replaced ``INSERT ... SELECT * FROM unnest(one array per column)`` (formerly
app/arrayinsert.py), whose arrays psycopg builds in Python, element by element: the largest
single cost of the listener's group commit (docs/PERFORMANCE.md, "Intake, storage side:
binary COPY"). A binary COPY sends the rows as they are: psycopg's ``write_row`` formats
each row in C (psycopg_binary) with the dumpers chosen once per statement by ``set_types``,
and the server decodes each value with its type's binary receive function, as for a bound
parameter. Nothing comes back, so it suits tables
whose keys the caller makes (message ids) or does not read (serial ids).

COPY runs the table's triggers (statement-level ones with transition tables too) and checks
its constraints as an INSERT does; a value too long for a ``varchar(n)`` is an error, as
with Core's INSERT (an ``unnest`` cast to ``varchar(n)[]`` cut it silently).

The COPY runs on the raw psycopg cursor of the caller's connection, so it is part of the
caller's transaction. It bypasses SQLAlchemy's ``before_cursor_execute`` and
``after_cursor_execute`` events (and echo). Values go through the column types' bind
processors (``UTCDateTime``'s checks, JSON's serialisation), as through Core. It cannot run
inside a psycopg pipeline (``database.pipelined``).

For PostgreSQL only; callers keep their Core path for SQLite, and the listener's group
commit keeps it for batches with more than ``SMALL_BATCH_BYTES`` of content (a large message
goes as one bound ``bytea`` parameter, as it always has).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

# Above this much content per batch, the listener keeps the Core INSERT (see the module's text).
SMALL_BATCH_BYTES = 1024 * 1024

_Processor = Any  # a column type's bind processor, or None


def supported(connection: sa.Connection) -> bool:
    return connection.dialect.name == "postgresql"

# SQLAlchemy's type -> the name psycopg knows its binary dumper by; subclasses before their
# bases (a SmallInteger is an Integer). Binary COPY applies no cast: the sizes must match.
_WIRE_TYPES = (
    (sa.String, "text"), (sa.SmallInteger, "int2"), (sa.BigInteger, "int8"),
    (sa.Integer, "int4"), (sa.Float, "float8"), (sa.LargeBinary, "bytea"),
)


def wire_type(column: sa.Column[Any], dialect: Dialect) -> str:
    """The psycopg type name whose binary dumper writes ``column``'s (processed) values."""
    implementation = column.type.dialect_impl(dialect)
    if isinstance(implementation, sa.TypeDecorator):
        implementation = implementation.impl_instance
    if isinstance(implementation, sa.JSON):  # the processor wraps values in psycopg's Json
        return "jsonb" if isinstance(implementation, postgresql.JSONB) else "json"
    if isinstance(implementation, sa.DateTime):
        return "timestamptz" if implementation.timezone else "timestamp"
    for kind, name in _WIRE_TYPES:
        if isinstance(implementation, kind):
            return name
    raise TypeError(f"no binary COPY type for {column.table.name}.{column.name} "
                    f"({column.type!r})")


class CopyInsert:
    """``COPY table (columns) FROM STDIN (FORMAT BINARY)`` of rows given as tuples in the
    order of ``columns``."""

    def __init__(self, table: sa.Table, columns: Sequence[str] | None = None) -> None:
        self.table = table
        if columns is None:  # every column but an autoincrementing key
            columns = [c.name for c in table.c
                       if not (c.primary_key and c.autoincrement is True)]
        self.columns = tuple(columns)
        self._compiled: dict[str, tuple[str, list[int], list[tuple[int, _Processor]]]] = {}

    def _compile(self, dialect: Dialect) -> tuple[str, list[int], list[tuple[int, _Processor]]]:
        preparer = dialect.identifier_preparer
        types = []  # as oids: set_types looks names up in the registry on every call
        processors = []
        for index, name in enumerate(self.columns):
            column = self.table.c[name]
            types.append(psycopg.adapters.types.get_oid(wire_type(column, dialect)))
            process = column.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                processors.append((index, process))
        sql = (f"COPY {preparer.format_table(self.table)} "
               f"({', '.join(preparer.quote(name) for name in self.columns)}) "
               f"FROM STDIN (FORMAT BINARY)")
        return sql, types, processors

    def _compiled_for(self, dialect: Dialect) -> tuple[str, list[int],
                                                         list[tuple[int, _Processor]]]:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = self._compile(dialect)
        return compiled

    def statement(self, dialect: Dialect) -> str:
        return self._compiled_for(dialect)[0]

    def execute(self, connection: sa.Connection, rows: Iterable[Sequence[Any]]) -> None:
        """Copy ``rows`` (tuples, one value per column of the statement, in its order) in the
        connection's transaction. Not seen by ``before_cursor_execute`` listeners."""
        sql, types, processors = self._compiled_for(connection.dialect)
        cursor = connection.connection.cursor()
        try:
            with cursor.copy(sql) as copy:
                copy.set_types(types)
                if not processors:
                    for row in rows:
                        copy.write_row(row)
                    return
                for row in rows:
                    values = list(row)
                    for index, process in processors:
                        values[index] = process(values[index])  # None too, as Core
                    copy.write_row(values)
        finally:
            cursor.close()
