"""Message content compressed with lz4 instead of pglz on PostgreSQL

Revision ID: 0009
Revises: 0008

PostgreSQL compresses a large ``bytea`` value (TOAST) with pglz by default: for a 7.2 MB
message that is 60-170 ms of the server's CPU on every acceptance, and pglz gives up on mail
that is text first and an attachment after (it stores it whole). lz4 took 27-47 ms for the
same values and stored such mail at 73 % (docs/PERFORMANCE.md, "The 7 MB message").

Only values written from now on are compressed with lz4; queued content stays as written
(PostgreSQL reads both). A server built without lz4 keeps pglz (the migration says so). SQLite
has no such setting: nothing changes there.
"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def _lz4_available(bind) -> bool:
    return bool(bind.execute(sa.text(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
    )).scalar())


def upgrade():
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if not _lz4_available(bind):
        print("0009: this PostgreSQL server has no lz4 support; message content stays pglz")
        return
    op.execute("ALTER TABLE message_contents ALTER COLUMN raw SET COMPRESSION lz4")


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE message_contents ALTER COLUMN raw SET COMPRESSION DEFAULT")
