"""messages (queue_state, next_attempt_at, id): claims of deferred mail read only what is due

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.create_index("ix_messages_queue_state_due", "messages",
                    ["queue_state", "next_attempt_at", "id"], unique=False)


def downgrade():
    op.drop_index("ix_messages_queue_state_due", table_name="messages")
