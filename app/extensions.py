"""The single home of the Flask extensions: the database (``db``, ``Base``) and its settings.

Light on purpose: the models import it, so every process does. The project's flask-smorest
flavour (``Api``, ``Blueprint``, the contract's parser) lives in ``app/api.py`` and Flask-Migrate
and flask-sock are set up by ``create_app`` for the API only, so the processes that serve no
HTTP (worker, listener, dispatcher) never import them (docs/PERFORMANCE.md, start-up).
"""

from __future__ import annotations

import typing

import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

from .database import Session

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """The typed declarative base of every model (app/models.py): ``class Message(Base)``.

    Models subclass it, not ``db.Model``: Flask-SQLAlchemy builds ``db.Model`` from this class
    at run time (same registry, same metadata), which a type checker cannot follow. Nothing uses
    what ``db.Model`` adds (``Model.query``, bind keys, table auto-naming).
    """

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


# Session: GET requests read on autocommit connections on PostgreSQL (app/database.py).
db = SQLAlchemy(model_class=Base, session_options={"class_": Session})


PYSQLITE_DEFAULT_TIMEOUT_MS = 5000


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
    # 30 s unless the engine was given a timeout of its own (``connect_args``: tests that
    # lock the database for a few seconds make the writer give up sooner); pysqlite's own
    # default is 5 s, which a busy worker and listener together can exceed.
    cursor.execute("PRAGMA busy_timeout")
    if cursor.fetchone()[0] == PYSQLITE_DEFAULT_TIMEOUT_MS:
        cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
