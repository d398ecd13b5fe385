"""Migration 0009: on PostgreSQL, message content is written with lz4 (pglz cost a large
message up to 170 ms of the server's CPU and could not compress text followed by an
attachment); a downgrade gives the column back to the server's default."""

from __future__ import annotations

import sqlalchemy as sa
from flask_migrate import downgrade, upgrade

from app import create_app
from app.extensions import db

# pg_attribute.attcompression: 'l' lz4, 'p' pglz, '' the server's default_toast_compression
COLUMN_COMPRESSION = sa.text(
    "SELECT attcompression FROM pg_attribute "
    "WHERE attrelid = 'message_contents'::regclass AND attname = 'raw'")
VALUE_COMPRESSION = sa.text(
    "SELECT pg_column_compression(raw) FROM message_contents WHERE message_id = :id")


def _store(conn: sa.Connection, message_id: str, raw: bytes) -> None:
    conn.execute(sa.text(
        "INSERT INTO messages (id, sender, subject, size, priority, queue_state, attempts, "
        "origin, created_at, updated_at, next_attempt_at) VALUES (:id, 'a@example.com', 's', "
        ":size, 0, 'held', 0, 'api', now(), now(), now())"), {"id": message_id, "size": len(raw)})
    conn.execute(sa.text("INSERT INTO message_contents (message_id, raw) VALUES (:id, :raw)"),
                 {"id": message_id, "raw": raw})


def test_0009_writes_new_content_with_lz4_and_keeps_what_was_written(empty_url):
    if not empty_url.startswith("postgresql"):
        # SQLite has no per-column compression: the revision is a no-op there, and the chain
        # must still pass through it.
        app = create_app({"DATABASE_URL": empty_url, "TESTING": True})
        with app.app_context():
            upgrade()
            downgrade(revision="0008")
            upgrade()
            db.engine.dispose()
        return
    text_then_attachment = b"Subject: big\r\n\r\n" + b"La de da de da 1.\r\n" * 20000
    app = create_app({"DATABASE_URL": empty_url, "TESTING": True})
    with app.app_context():
        try:
            upgrade(revision="0008")
            with db.engine.begin() as conn:
                assert conn.execute(COLUMN_COMPRESSION).scalar() == ""
                _store(conn, "msg-before00001", text_then_attachment)
            upgrade()
            with db.engine.begin() as conn:
                assert conn.execute(COLUMN_COMPRESSION).scalar() == "l"
                _store(conn, "msg-after000001", text_then_attachment)
                assert conn.execute(VALUE_COMPRESSION, {"id": "msg-before00001"}).scalar() == "pglz"
                assert conn.execute(VALUE_COMPRESSION, {"id": "msg-after000001"}).scalar() == "lz4"
                # both read back whole
                for message_id in ("msg-before00001", "msg-after000001"):
                    raw = conn.execute(sa.text("SELECT raw FROM message_contents WHERE "
                                               "message_id = :id"), {"id": message_id}).scalar()
                    assert bytes(raw) == text_then_attachment
            downgrade(revision="0008")
            with db.engine.begin() as conn:
                assert conn.execute(COLUMN_COMPRESSION).scalar() == ""
        finally:
            db.session.remove()
            db.engine.dispose()
