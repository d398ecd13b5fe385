"""A prebuilt Core SELECT run on the raw psycopg cursor of a connection's transaction.

The listener's group commit reads the DKIM keys and the hold/defer rules in force once per
batch. Through Core each read costs ~140 us of CPU (the execution context, the parameter and
result processing); the same SQL on psycopg's own cursor ~85 us (docs/PERFORMANCE.md,
"Intake, one group commit at a time"), in a process whose rate is its CPU. The statement is
rendered once, with its literal parameters; the rows come back as psycopg makes them (named
tuples with the statement's column names), so this suits columns whose SQLAlchemy types do no
result processing on PostgreSQL (strings, integers, ``UTCDateTime``: psycopg's aware
datetime). Like ``CopyInsert`` it bypasses ``before_cursor_execute`` listeners. SQLite (and
any other dialect) runs the Core statement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import psycopg
import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg


class RawSelect:
    def __init__(self, statement: sa.Select | sa.CompoundSelect) -> None:
        self.statement = statement
        compiled = statement.compile(dialect=postgresql_psycopg.dialect())
        self._sql = str(compiled)
        self._params = dict(compiled.params)

    def rows(self, connection: sa.Connection, params: Mapping[str, Any] | None = None
             ) -> Sequence[Any]:
        """The statement's rows, in the connection's transaction; ``params`` bind the
        statement's ``bindparam``s by name."""
        if connection.dialect.name != "postgresql":
            return connection.execute(self.statement, dict(params or {})).all()
        driver = cast(psycopg.Connection[Any], connection.connection.driver_connection)
        with driver.cursor(row_factory=namedtuple_row) as cursor:
            cursor.execute(self._sql, {**self._params, **(params or {})})
            return cursor.fetchall()
